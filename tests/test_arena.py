"""GPU chunk arena: the pure slot plan (CPU), config, and on the device machine a run whose
arena holds every gathered chunk and gradient buffer: no growth after the first step, flat
fragmentation, and the same numbers as torch's shared allocator.
"""

from __future__ import annotations

import pytest
import torch

from tierlift.errors import ConfigError
from tierlift.offload.arena import ChunkArena, ChunkShape, SlotKind, plan_arena
from tierlift.parallel.config import ZeroConfig

MiB = 1 << 20


def _layer_chunks(n_groups: int, numel: int = 1000, shard: int = 500, root: bool = True) -> list[ChunkShape]:
    """A root chunk (persistent) plus one chunk per group, the last group's twice as large."""
    out = [ChunkShape(0, 4000, 2000, True)] if root else []
    for g in range(n_groups):
        k = 2 if g == n_groups - 1 else 1
        out.append(ChunkShape(g, numel * k, shard * k, False))
    return out


def _by(plan, kind):
    return {c.nbytes: c.count for c in plan.classes if c.kind is kind}


def test_stage3_gathered_slots_cover_the_prefetch_window():
    plan = plan_arena(_layer_chunks(8), world_size=2, stage=3, prefetch_units=2, compute_itemsize=2,
                      reduce_itemsize=4, gather_shards_from_host=False)
    # 4 consecutive groups alive (running, 2 ahead, 1 being resharded): 3 of the small size and the
    # last group's large one can share a window; the persistent root never churns.
    assert _by(plan, SlotKind.GATHERED) == {2000: 4, 4000: 1}
    assert _by(plan, SlotKind.GATHER_SHARD) == {}
    # Gradients: any 3 consecutive chunks in flight, root included (it is reduced like any chunk).
    assert _by(plan, SlotKind.GRAD_FLAT) == {4000: 3, 8000: 1, 16000: 1}
    assert _by(plan, SlotKind.GRAD_SHARD) == {2000: 3, 4000: 1, 8000: 1}
    assert all(c.stream == "compute" for c in plan.classes)
    assert plan.total_bytes == sum(c.nbytes * c.count for c in plan.classes)
    assert "gathered" in plan.describe()


@pytest.mark.parametrize("prefetch, expect", [(0, {2000: 2}), (1, {2000: 3}), (5, {2000: 6})])
def test_window_grows_with_prefetch_and_stops_at_the_group_count(prefetch, expect):
    plan = plan_arena([ChunkShape(g, 1000, 500, False) for g in range(6)], world_size=1, stage=3,
                      prefetch_units=prefetch, compute_itemsize=2, reduce_itemsize=4, gather_shards_from_host=True)
    assert _by(plan, SlotKind.GATHERED) == expect
    assert _by(plan, SlotKind.GATHER_SHARD) == {}  # one rank: the host copy goes straight into the chunk
    assert _by(plan, SlotKind.GRAD_SHARD) == {}    # one rank: no reduce-scatter output


def test_gather_shards_from_the_host_sit_on_the_copy_stream():
    plan = plan_arena(_layer_chunks(3, root=False), world_size=4, stage=3, prefetch_units=1,
                      compute_itemsize=2, reduce_itemsize=2, gather_shards_from_host=True)
    shards = [c for c in plan.classes if c.kind is SlotKind.GATHER_SHARD]
    assert {c.nbytes: c.count for c in shards} == {1000: 2, 2000: 1} and all(c.stream == "h2d" for c in shards)


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2_reserve_only_gradient_buffers(stage):
    plan = plan_arena(_layer_chunks(4), world_size=2, stage=stage, prefetch_units=2, compute_itemsize=2,
                      reduce_itemsize=4, gather_shards_from_host=False)
    assert {c.kind for c in plan.classes} == {SlotKind.GRAD_FLAT, SlotKind.GRAD_SHARD}


def test_nested_chunks_of_one_group_count_together():
    # A block with 4 expert chunks: all gathered with their group.
    chunks = [ChunkShape(g, 1000, 500, False) for g in range(3) for _ in range(4)]
    plan = plan_arena(chunks, world_size=1, stage=3, prefetch_units=0, compute_itemsize=2, reduce_itemsize=4,
                      gather_shards_from_host=False)
    assert _by(plan, SlotKind.GATHERED) == {2000: 8}


def test_bad_plan_arguments_and_empty_models():
    with pytest.raises(ValueError, match="prefetch_units=-1"):
        plan_arena([], world_size=1, stage=3, prefetch_units=-1, compute_itemsize=2, reduce_itemsize=4,
                   gather_shards_from_host=False)
    assert plan_arena([], world_size=1, stage=3, prefetch_units=2, compute_itemsize=2, reduce_itemsize=4,
                      gather_shards_from_host=False).classes == ()


def test_no_arena_on_cpu():
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig
    from tierlift.parallel.zero import ZeroEngine
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    with pytest.raises(ValueError, match="CUDA"):
        ChunkArena(plan_arena(_layer_chunks(2), world_size=1, stage=3, prefetch_units=2, compute_itemsize=2,
                              reduce_itemsize=4, gather_shards_from_host=False), torch.device("cpu"))
    model = build_model(ModelConfig(kind="gpt", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                    max_seq_len=16), seed=1)
    eng = ZeroEngine(model, ZeroConfig(arena="pool"), PrecisionConfig(), OptimizerConfig(), torch.device("cpu"))
    assert eng.arena is None and eng.arena_stats() == {}  # CPU has no caching allocator to protect


def test_arena_setting_is_validated():
    assert ZeroConfig().arena == "shared"
    with pytest.raises(ConfigError, match="zero.arena"):
        ZeroConfig(arena="fixed")


# -- GPU (device machine) -------------------------------------------------------------------------
def _fit(arena: str, offload: str, steps: int = 8):
    from tierlift import TrainConfig, Trainer
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig

    model = build_model(ModelConfig(kind="gpt", vocab_size=512, d_model=256, n_layers=6, n_heads=4,
                                    max_seq_len=64), seed=5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (4, 65), generator=g)
    samples = [{"input_ids": ids[i, :-1], "labels": ids[i, 1:]} for _ in range(steps) for i in range(4)]
    cfg = {"zero": {"stage": 3, "arena": arena}, "precision": {"compute": "bf16", "reduce": "fp32"},
           "optimizer": {"grad_clip": 0.0}, "train": {"micro_batch_size": 4, "max_steps": steps},
           "data": {"shuffle": False}, "run": {"device": "cuda"}}
    if offload == "cpu":
        cfg["offload"] = {"optimizer": {"kind": "cpu"}, "param": {"kind": "cpu"}}
    trainer = Trainer(model, TrainConfig.from_dict(cfg), train_data=samples)
    summary = trainer.fit()
    arena_obj = trainer.engine.arena
    # Stage 3 leaves the model's parameters resharded (storage of size 0): read the shards' state.
    params = [t.float().cpu() for t in trainer.engine.full_state_dict().values()]
    return summary, arena_obj, params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_gpu_arena_holds_the_churn_and_changes_no_number(offload):
    import gc

    pooled, arena, p_pool = _fit("pool", offload)
    assert arena is not None and arena.reserved_at_setup >= arena.plan.total_bytes
    growth = pooled.arena_growth_bytes
    assert len(growth) == 8 and growth == sorted(growth), growth  # the pool never gives blocks back
    if offload == "none":
        # Step 1 runs without prefetch (the order is recorded on it); from step 2 on the schedule
        # repeats, and so must the pool's size.
        assert len(set(growth[1:])) == 1, growth
    else:  # gradients waiting for the host optimizer grow it, within their budget
        assert growth[-1] <= 4 << 30, growth
    assert len(pooled.gpu_frag_bytes) == 8
    shared, none_arena, p_shared = _fit("shared", offload)
    assert none_arena is None and shared.arena_growth_bytes == [] and len(shared.gpu_frag_bytes) == 8
    # Where a buffer lives changes no arithmetic; CUDA's embedding backward adds with atomics, so
    # two runs may differ in the last bits whatever the allocator.
    torch.testing.assert_close(pooled.losses, shared.losses, rtol=1e-3, atol=1e-4)
    for a, b in zip(p_pool, p_shared):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    # The engine is gone, its model's views into the pool may live on: the pool must outlive
    # them (torch aborts on a pool destroyed with blocks in use), and a next engine reuses it.
    del arena
    gc.collect()
    again, arena2, _ = _fit("pool", offload, steps=2)
    assert arena2 is not None and len(again.losses) == 2
