"""One placement rule, one ExecutionPlan: the engine is built from the plan and its
actual placement equals the plan for every offload config; ``tierlift plan`` shows
the placement the engine then has; policy decisions become new plans the engine
executes and verifies at a step boundary, without changing a loss; a mismatch is
an error naming the chunk."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import yaml

from _dist import run_ranks

# Uneven chunks: the root (embeddings, head) 18432 elements per rank, each block 14336.
# max_in_cpu=18336 holds one block but not the root: first-fit keeps chunk 1 in host
# memory, where a prefix rule would keep nothing (the (100, 50, 50, 50) / 60 case).
MODEL = {"kind": "gpt", "vocab_size": 512, "d_model": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 16}
SHARDS = (18432, 14336, 14336, 14336)
MIXED_CAP = 18336
MIXED = ("nvme", "host", "nvme", "nvme")


def _offload(kind: str, path: str):
    from tierlift.offload.policy import CPUOffload, NoOffload, NVMeOffload, OffloadConfig
    nv = NVMeOffload(path=path, buffer_count=2, buffer_size=4096)
    return {"none": OffloadConfig(),
            "cpu": OffloadConfig(optimizer=CPUOffload()),
            "cpu_params": OffloadConfig(optimizer=CPUOffload(), param=CPUOffload()),
            "nvme": OffloadConfig(optimizer=nv, param=CPUOffload()),
            "nvme_params": OffloadConfig(optimizer=nv, param=NVMeOffload(path=path)),
            "mixed": OffloadConfig(optimizer=NVMeOffload(path=path, max_in_cpu=MIXED_CAP, buffer_count=2),
                                   param=NoOffload())}[kind]


def _engine(offload, prefetch: int = 2, clip: float = 0.0):
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine
    model = build_model(ModelConfig(**MODEL), seed=5)
    return model, ZeroEngine(model, ZeroConfig(stage=3, prefetch_units=prefetch), PrecisionConfig(),
                             OptimizerConfig(lr=3e-3, grad_clip=clip), torch.device("cpu"), offload=offload)


# -- the rule ------------------------------------------------------------------------

def test_place_chunks_is_first_fit_in_forward_order():
    from tierlift.offload.execplan import place_chunks
    assert place_chunks((100, 50, 50, 50), 60) == ("nvme", "host", "nvme", "nvme")
    assert place_chunks((100, 50, 50, 50), 150) == ("host", "host", "nvme", "nvme")
    assert place_chunks((100, 50, 50, 50), 0) == ("nvme",) * 4


def test_auto_plan_packs_the_host_budget_past_a_large_first_chunk():
    """A host budget for one block but not the root: the planner keeps a block in host
    memory (a prefix would put everything on NVMe) and the engine's rule agrees."""
    from tierlift.offload.execplan import place_chunks
    from tierlift.runtime.planner import Budgets, ModelShape, NodeRates, TrainingShape, _host_bytes, plan
    shape = ModelShape.from_numels([s << 20 for s in (100, 50, 50, 50)])  # past a staging piece: staging is fixed
    tr = TrainingShape(tokens_per_step=4096, activation_bytes=1 << 20)
    budget = _host_bytes(shape, tr, "nvme", MIXED, 8) + 1024
    p = plan(shape, Budgets(80 << 30, budget), NodeRates(), tr, optimizer_kind="nvme", param_kind="none")
    assert p.optimizer_tiers == MIXED
    assert place_chunks(shape.shard_numel, p.max_in_cpu) == MIXED


# -- the plan is what the engine has ---------------------------------------------------

@pytest.mark.parametrize("kind", ["none", "cpu", "cpu_params", "nvme", "nvme_params", "mixed"])
def test_plan_placement_equals_engine_placement(tmp_path, kind):
    from tierlift.offload.execplan import param_tiers
    from tierlift.parallel.plan_exec import actual_placement
    _, eng = _engine(_offload(kind, str(tmp_path / "nv")))
    try:
        plan = eng.plan
        assert tuple(c.shard_numel for c in plan.chunks) == SHARDS
        assert actual_placement(eng) == plan.placement  # also checked by the engine at construction
        want = {"none": ("gpu",) * 4, "cpu": ("host",) * 4, "cpu_params": ("host",) * 4, "nvme": ("nvme",) * 4,
                "nvme_params": ("nvme",) * 4, "mixed": MIXED}[kind]
        assert plan.optimizer_tiers == want
        assert [p for _, p in plan.placement] == list(param_tiers(want, eng.offload.param.KIND))
        if eng.host_opt is not None and eng.host_opt.nvme is not None:  # the extents the file really has
            assert eng.host_opt.nvme.file.plan.same_layout(plan.nvme_extents)
    finally:
        eng.close()


@pytest.mark.parametrize("model", [MODEL, {"kind": "moe-gpt", "vocab_size": 64, "d_model": 32, "n_layers": 2,
                                            "n_heads": 4, "max_seq_len": 16, "n_experts": 4, "top_k": 2}])
def test_plan_groups_and_arena_are_the_engines(model):
    """The plan groups chunks as the engine does (MoE experts join their block), so the
    arena it plans is the one the engine's groups need, at the plan's prefetch depth."""
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.offload.arena import ChunkShape, plan_arena
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine
    eng = ZeroEngine(build_model(ModelConfig(**model), seed=5), ZeroConfig(stage=3, prefetch_units=1),
                     PrecisionConfig(compute="bf16"), OptimizerConfig(), torch.device("cpu"))
    try:
        group_of = {c.spec.index: g.index for g in eng.groups for c in g.chunks}
        assert [c.group for c in eng.plan.chunks] == [group_of.get(i, -1) for i in range(len(eng.chunks))]
        shapes = [ChunkShape(group_of.get(c.spec.index, 0), c.spec.padded_numel, c.spec.shard_numel,
                             c.spec.persistent or c.spec.index not in group_of
                             or eng.groups[group_of[c.spec.index]].persistent) for c in eng.chunks]
        for depth in (1, 3):
            want = plan_arena(shapes, world_size=1, stage=3, prefetch_units=depth, compute_itemsize=2,
                              reduce_itemsize=eng.reduce_dtype.itemsize, gather_shards_from_host=False)
            assert eng.plan.with_prefetch(depth).arena == want and want.classes
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["none", "cpu_params", "mixed"])
def test_gpu_engine_executes_its_plan(tmp_path, kind):
    """On a GPU the engine reserves the arena its plan has and holds the planned placement."""
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.plan_exec import actual_placement
    from tierlift.parallel.zero import ZeroEngine
    model = build_model(ModelConfig(**MODEL), seed=5)
    eng = ZeroEngine(model, ZeroConfig(stage=3, arena="pool"), PrecisionConfig(compute="bf16"), OptimizerConfig(),
                     torch.device("cuda", 0), offload=_offload(kind, str(tmp_path / "nv")))
    try:
        assert eng.arena is not None and eng.arena.plan == eng.plan.arena and eng.plan.gpu
        assert actual_placement(eng) == eng.plan.placement
        assert eng.plan.optimizer_tiers == {"none": ("gpu",) * 4, "cpu_params": ("host",) * 4, "mixed": MIXED}[kind]
    finally:
        eng.close()


def test_cli_plan_shows_the_placement_the_engine_has(tmp_path, capsys):
    from tierlift.launch.cli import main
    from tierlift.parallel.plan_exec import actual_placement
    from tierlift.runtime.config import TrainConfig
    nvme = str(tmp_path / "nv")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2}, "run": {"device": "cpu"},
        "offload": {"optimizer": {"kind": "nvme", "path": nvme, "max_in_cpu": MIXED_CAP, "buffer_count": 2},
                    "param": {"kind": "none"}}}))
    rc = main(["plan", str(path), "--world-size", "1", "--as-configured", "--json", "--gpu-budget", "80GiB",
               "--host-budget", "64GiB", "--nvme-budget", "1TiB"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    planned = tuple((c["optimizer"], c["param"]) for c in d["execution"]["chunks"])
    assert tuple(p["optimizer_tier"] for p in d["placements"]) == MIXED
    cfg = TrainConfig.load(str(path))
    _, eng = _engine(cfg.offload)
    try:
        assert actual_placement(eng) == planned
    finally:
        eng.close()


def test_cli_plan_is_multi_node_aware(tmp_path, capsys):
    """Host memory is per node: 4 ranks on 2 nodes get a larger share each than 4 on one."""
    from tierlift.launch.cli import main
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "data": {"seq_len": 16}, "run": {"device": "cpu"},
                                    "offload": {"optimizer": {"kind": "cpu"}}}))
    out = {}
    for rpn in ("4", "2"):
        assert main(["plan", str(path), "--world-size", "4", "--ranks-per-node", rpn, "--json"]) == 0
        out[rpn] = json.loads(capsys.readouterr().out)
    two = out["2"]
    assert two["ranks_per_node"] == 2 and two["execution"]["nodes"] == 2 and two["execution"]["ranks_per_node"] == 2
    assert two["execution"]["host_budget_per_node_bytes"] == 2 * two["budgets"]["host_bytes"]
    assert two["budgets"]["host_bytes"] > out["4"]["budgets"]["host_bytes"]


def test_planner_knows_parameters_on_nvme(tmp_path, caplog):
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.replan import Replanner
    nvme = str(tmp_path / "nv")
    cfg = TrainConfig.from_dict({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2}, "run": {"device": "cpu"},
        "offload": {"optimizer": {"kind": "nvme", "path": nvme, "buffer_count": 2},
                    "param": {"kind": "nvme", "path": nvme}}})
    _, eng = _engine(cfg.offload)
    try:
        with caplog.at_level(logging.INFO, logger="tierlift.replan"):
            rp = Replanner(eng, cfg, 1)
        assert "not a choice the planner knows" not in caplog.text
        assert rp.policy is not None and rp.policy.plan.param_kind == "nvme"
        assert [(p.optimizer_tier, p.param_tier) for p in rp.policy.plan.placements] == list(eng.plan.placement)
        c = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.precision.compute]
        assert rp.policy.plan.nvme_bytes == (12 + c) * sum(SHARDS)  # state and compute-dtype parameters on disk
    finally:
        eng.close()


def test_replanner_costs_chunks_where_the_plan_puts_them(tmp_path):
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.replan import Replanner
    cfg = TrainConfig.from_dict({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2}, "run": {"device": "cpu"},
        "zero": {"prefetch_units": 1},
        "offload": {"optimizer": {"kind": "nvme", "path": str(tmp_path / "nv"), "max_in_cpu": MIXED_CAP,
                                  "buffer_count": 2}}})
    _, eng = _engine(cfg.offload, prefetch=1)
    try:
        p = Replanner(eng, cfg, 1).policy.plan
        assert p.optimizer_tiers == MIXED and p.prefetch_units == 1 and p.max_in_cpu == SHARDS[1]
    finally:
        eng.close()


# -- decisions are executed and verified -------------------------------------------------

def _batches(rank: int, world: int, steps: int):
    g = torch.Generator().manual_seed(11)
    data = (torch.randint(0, 512, (steps, world * 2, 1), generator=g)
            + torch.randint(1, 4, (steps, world * 2, 1), generator=g) * torch.arange(17)) % 512
    for s in range(steps):
        rows = data[s, rank * 2:(rank + 1) * 2]
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def _run_policy(tmp: str, decide: bool, steps: int = 6):
    """Train ``steps`` steps (clipping: deferred host steps); with ``decide``, after step 2
    the policy sees host pressure and prefetch stalls, and its decisions are applied."""
    import torch.distributed as dist

    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.replan import Replanner
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = TrainConfig.from_dict({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2}, "run": {"device": "cpu"},
        "zero": {"prefetch_units": 1}, "optimizer": {"lr": 3e-3, "grad_clip": 0.5},
        "offload": {"optimizer": {"kind": "nvme", "path": os.path.join(tmp, f"nv-{decide}-{rank}"),
                                  "max_in_cpu": 10 ** 9, "buffer_count": 2}},
        "policy": {"stall_ms": 0.0, "stall_patience": 1, "cooldown_steps": 100,
                   "host_min_available_bytes": 2 ** 50}})
    model, eng = _engine(cfg.offload, prefetch=1, clip=0.5)
    rp = Replanner(eng, cfg, world)
    losses, kinds = [], []
    for s, batch in enumerate(_batches(rank, world, steps)):
        eng.begin_step(3e-3)
        eng.forward_begin()
        loss = model(**batch).loss
        eng.backward(loss)
        eng.step(3e-3)
        losses.append(float(loss.detach()))
        if decide and s == 2:
            for d in rp.policy.observe(s, {"host_available_bytes": 1.0, "prefetch_stall_ms": 5.0}):
                rp.apply(d)  # the engine executes the new plan and verifies it
                kinds.append(d.kind)
    tiers, depth = [hc.tier.value for hc in eng.host_opt.chunks], eng.cfg.prefetch_units
    assert eng.plan.optimizer_tiers == tuple(tiers) and eng.plan.prefetch_units == depth
    assert cfg.zero.prefetch_units == 1 and cfg.offload.optimizer.max_in_cpu == 10 ** 9  # the user's config
    eng.close()
    return losses, kinds, tiers, depth


def test_policy_decisions_are_executed_verified_and_keep_the_losses(tmp_path):
    ref, _, tiers_ref, depth_ref = _run_policy(str(tmp_path), decide=False)
    got, kinds, tiers, depth = _run_policy(str(tmp_path), decide=True)
    assert sorted(kinds) == ["move_to_nvme", "prefetch_deeper"]
    assert tiers_ref == ["host"] * 4 and tiers == ["nvme"] * 4  # every chunk's state moved
    assert depth_ref == 1 and depth == 2
    assert got == ref  # bit-identical: placement and prefetch never touch the numbers


def _two_rank_policy(tmp):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    return _run_policy(tmp, decide=False), _run_policy(tmp, decide=True)


@pytest.mark.slow
def test_policy_decisions_on_two_gloo_ranks(tmp_path):
    (ref, _, _, _), (got, kinds, tiers, depth) = run_ranks(_two_rank_policy, 2, str(tmp_path))
    assert sorted(kinds) == ["move_to_nvme", "prefetch_deeper"] and tiers == ["nvme"] * 4 and depth == 2
    assert got == ref


# -- mismatches fail loudly -----------------------------------------------------------------

def test_a_plan_moves_state_only_where_a_tier_exists(tmp_path):
    _, eng = _engine(_offload("cpu", str(tmp_path / "nv")))
    try:
        with pytest.raises(ValueError, match="chunk 0: optimizer state cannot move host -> nvme"):
            eng.plan.with_optimizer_tiers(("nvme",) * 4)  # no extents: kind cpu
    finally:
        eng.close()


def test_a_skipped_move_fails_loudly(tmp_path, monkeypatch):
    from tierlift.offload.execplan import PlanMismatch
    from tierlift.parallel.plan_exec import apply_plan, verify
    _, eng = _engine(_offload("mixed", str(tmp_path / "nv")))
    try:
        with pytest.raises(ValueError, match=r"chunk 0's optimizer state is in nvme"):
            eng.host_opt.move_to_nvme([0])  # not in host memory: an error, not a silent no-op
        before = eng.plan
        monkeypatch.setattr(eng.host_opt, "move_to_nvme", lambda indices: [])  # a move that does not happen
        with pytest.raises(PlanMismatch, match=r"chunk 1 \(layers\.0\) is planned at optimizer=nvme, "
                                               r"param=gpu but the engine has optimizer=host, param=gpu"):
            apply_plan(eng, eng.plan.with_optimizer_tiers(("nvme",) * 4))
        eng.plan = before.with_prefetch(3)  # a plan the engine was not told to execute
        with pytest.raises(PlanMismatch, match="prefetch is 2 unit"):
            verify(eng, "at a step boundary")
    finally:
        eng.close()


def test_an_engine_built_from_a_plan_it_cannot_execute_fails_loudly(tmp_path):
    from tierlift.offload.execplan import PlanMismatch
    _, eng = _engine(_offload("cpu_params", str(tmp_path / "nv")))
    plan = eng.plan
    eng.close()
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine
    with pytest.raises(PlanMismatch, match=r"after construction: chunk 0 \(\(root\)\) is planned at "
                                           r"optimizer=host, param=host but the engine has optimizer=host, "
                                           r"param=gpu"):
        ZeroEngine(build_model(ModelConfig(**MODEL), seed=5), ZeroConfig(stage=3), PrecisionConfig(),
                   OptimizerConfig(), torch.device("cpu"), offload=_offload("cpu", str(tmp_path)), plan=plan)


# -- tierlift plan: bad input ---------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--world-size", "0"), ("--world-size", "-2"), ("--ranks-per-node", "0")])
def test_cli_plan_refuses_a_world_size_below_one(tmp_path, capsys, flag, value):
    from tierlift.launch.cli import main
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "data": {"seq_len": 16}, "run": {"device": "cpu"}}))
    assert main(["plan", str(path), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag}={int(value)}" in err and "must be >= 1" in err
