"""Offload parity on 2 CPU ranks (gloo, fp32): optimizer state (and parameters) on the
CPU tier and on the NVMe tier give the same losses and parameters as no offload,
within 1e-6 relative, with and without clipping; a checkpoint of NVMe-resident state
resumes onto the same curve."""

from __future__ import annotations

import os

import pytest
import torch

from _dist import run_ranks
from _fakes import arith_samples

STEPS = 10
MODEL = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}


def _policies(tmp: str, rank_tag: str):
    from tierlift.offload.policy import CPUOffload, NoOffload, NVMeOffload, OffloadConfig
    return {
        "none": OffloadConfig(),
        "cpu": OffloadConfig(optimizer=CPUOffload(), param=CPUOffload()),
        # small pieces: every chunk streams through the staging sets in several pieces
        "nvme": OffloadConfig(optimizer=NVMeOffload(path=os.path.join(tmp, f"nvme-{rank_tag}"), buffer_size=2048,
                                                    buffer_count=2), param=CPUOffload()),
        # parameters on NVMe too (the optimizer's extent file), read into pinned slots per gather
        "nvme_params": OffloadConfig(optimizer=NVMeOffload(path=os.path.join(tmp, f"nvp-{rank_tag}"), buffer_size=2048,
                                                           buffer_count=2),
                                     param=NVMeOffload(path=os.path.join(tmp, f"nvp-{rank_tag}"))),
        # a partial placement: some chunks' state in RAM, the rest on NVMe
        "mixed": OffloadConfig(optimizer=NVMeOffload(path=os.path.join(tmp, f"mixed-{rank_tag}"),
                                                     max_in_cpu=4096, buffer_size=1024, buffer_count=3),
                              param=NoOffload()),
    }


def _batches(rank: int, world: int, accum: int):
    g = torch.Generator().manual_seed(11)
    shape = (STEPS, world * accum * 2, 1)
    a, b = torch.randint(0, 64, shape, generator=g), torch.randint(1, 4, shape, generator=g)
    data = (a + b * torch.arange(17)) % 64
    for s in range(STEPS):
        rows = data[s, rank * accum * 2:(rank + 1) * accum * 2]
        yield [{"input_ids": rows[i:i + 2, :-1], "labels": rows[i:i + 2, 1:]} for i in range(0, accum * 2, 2)]


def _train(tmp, jobs, world):
    import torch.distributed as dist

    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for name, clip, stage, accum in jobs:
        model = build_model(ModelConfig(**MODEL), seed=5)
        # "_reuse": units stay gathered from forward to backward (every one: the distance is huge)
        base, reuse = name.removesuffix("_reuse"), name.endswith("_reuse")
        eng = ZeroEngine(model, ZeroConfig(stage=stage, max_reuse_distance=10**9 if reuse else 0), PrecisionConfig(),
                         OptimizerConfig(lr=3e-3, grad_clip=clip), torch.device("cpu"),
                         offload=_policies(tmp, f"{name}-{clip}-{stage}")[base])
        losses = []
        for micro in _batches(rank, world, accum):
            eng.begin_step(3e-3)
            tot = torch.zeros(1, dtype=torch.float64)
            for a, mb in enumerate(micro):
                eng.forward_begin()
                loss = model(**mb).loss
                tot += loss.detach().double()
                eng.backward(loss / accum, sync_grads=a == accum - 1)
            eng.step(3e-3)
            dist.all_reduce(tot)
            losses.append(float(tot) / (world * accum))
        if base == "nvme_params":  # the gathers really read parameters from NVMe, nothing kept on the host
            opt = eng.host_opt
            assert all(hc.param16 is None for hc in opt.chunks)
            opt.wait_all()  # deferred steps still read state in the background: count only the gathers' reads
            opt.nvme.drain()
            reads = opt.nvme.file.stats().reads
            eng.forward_begin()
            model(**micro[0])
            eng.forward_end_eval()
            units = [i for i in range(len(opt.chunks)) if i != eng.root.spec.index]  # the root stays gathered
            got, want = opt.nvme.file.stats().reads - reads, sum(len(opt.nvme.pieces[i]) for i in units)
            assert got == want, (got, want, [len(p) for p in opt.nvme.pieces], eng.root.spec.index)
            # A training micro-batch: backward gathers every unit again -- from NVMe, unless it
            # stayed gathered since its forward (max_reuse_distance).
            reads = opt.nvme.file.stats().reads
            eng.forward_begin()
            eng.backward(model(**micro[0]).loss, sync_grads=False)
            got = opt.nvme.file.stats().reads - reads
            assert got == (want if reuse else 2 * want), (name, got, want)
        out[(name, clip, stage, accum)] = (losses, eng.full_state_dict())
        eng.close()
    return out


@pytest.mark.slow
def test_offload_tiers_match_no_offload(tmp_path):
    jobs = [(name, clip, stage, accum) for name in ("none", "cpu", "nvme", "mixed")
            for clip, stage, accum in ((0.0, 3, 1), (0.05, 3, 2), (0.05, 2, 1))]
    jobs += [(name, clip, 3, accum) for name in ("nvme_params", "nvme_params_reuse")  # parameters: stage 3
             for clip, accum in ((0.0, 1), (0.05, 2))]
    jobs += [("none_reuse", 0.05, 3, 2), ("cpu_reuse", 0.0, 3, 1)]
    got = run_ranks(_train, 2, str(tmp_path), jobs, 2)
    for name, clip, stage, accum in jobs:
        if name == "none":
            continue
        ref_losses, ref_params = got[("none", clip, stage, accum)]  # resharded after every forward
        losses, params = got[(name, clip, stage, accum)]
        for s, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= 1e-6 * abs(b), f"{name} clip={clip} stage={stage} step {s}: {a} vs {b}"
        for k, ref in ref_params.items():
            err = float((params[k] - ref).norm() / ref.norm())
            assert err <= 1e-6, f"{name} clip={clip} stage={stage}: {k} rel err {err:.2e}"
    assert got[("none", 0.05, 3, 2)][0][-1] < 0.97 * got[("none", 0.05, 3, 2)][0][0]


def _resume(tmp, world, params_on_nvme=False):
    """Train 10 steps straight; train 5, checkpoint NVMe-resident state, rebuild, resume 5."""
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.trainer import Trainer

    def cfg(tag):
        return TrainConfig.from_dict({
            "model": MODEL, "data": {"seq_len": 16, "shuffle": True},
            "train": {"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": STEPS},
            "optimizer": {"lr": 3.0e-3, "grad_clip": 0.05}, "scheduler": {"warmup_steps": 2},
            "zero": {"stage": 3}, "run": {"device": "cpu"},
            # small pieces: the checkpoint streams every chunk's state through several of them
            "offload": {"optimizer": {"kind": "nvme", "path": os.path.join(tmp, tag), "buffer_size": 2048},
                        "param": {"kind": "nvme", "path": os.path.join(tmp, tag)} if params_on_nvme
                        else {"kind": "cpu"}}})

    ds = arith_samples(512, seed=2)
    t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg(f"a{os.environ['RANK']}"), train_data=ds)
    straight = t.fit().losses
    t.engine.close()
    t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg(f"b{os.environ['RANK']}"), train_data=ds)
    first = t.fit(max_steps=5).losses
    ckpt = os.path.join(tmp, "ckpt")
    t.save(ckpt)
    t.engine.close()
    t = Trainer.resume(ckpt, build_model(ModelConfig(**MODEL), seed=99), cfg(f"c{os.environ['RANK']}"), train_data=ds)
    rest = t.fit().losses
    t.engine.close()
    return straight, first + rest


@pytest.mark.slow
@pytest.mark.parametrize("params_on_nvme", [False, True], ids=["params-host", "params-nvme"])
def test_resume_from_nvme_resident_checkpoint_reproduces_curve(tmp_path, params_on_nvme):
    straight, resumed = run_ranks(_resume, 2, str(tmp_path), 2, params_on_nvme)
    assert len(resumed) == len(straight) == STEPS
    for s, (a, b) in enumerate(zip(resumed, straight)):
        assert a == pytest.approx(b, rel=1e-6, abs=0), f"step {s}: resumed {a} vs straight {b}"


def test_checkpoint_streams_nvme_state_a_piece_at_a_time(tmp_path):
    """Saving NVMe-resident state never reads a whole chunk into RAM: no chunk_state
    call, and the disk reads each piece of each kind exactly once."""
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.runtime.config import TrainConfig
    from tierlift.runtime.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 2, "max_steps": 2},
        "optimizer": {"grad_clip": 0.0}, "zero": {"stage": 3}, "run": {"device": "cpu"},
        "offload": {"optimizer": {"kind": "nvme", "path": str(tmp_path / "nvme"), "buffer_size": 1024},
                    "param": {"kind": "cpu"}}})
    t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg, train_data=arith_samples(64, seed=2))
    t.fit()
    opt = t.engine.host_opt

    def refuse(index):
        raise AssertionError(f"chunk {index}'s whole state was read into RAM")
    opt.chunk_state = refuse
    before = opt.nvme.file.stats().bytes_read
    t.save(str(tmp_path / "ckpt"))
    read = opt.nvme.file.stats().bytes_read - before
    plan = opt.nvme.file.plan
    used = [(i, lo) for i, ps in enumerate(opt.nvme.pieces) for lo, hi in ps  # pieces some parameter lies in
            if any(sg.shard_lo < hi and sg.shard_hi > lo for sg in opt.segments[i])]
    want = sum(plan[(i, k, lo)].padded for i, lo in used for k in ("master", "exp_avg", "exp_avg_sq"))
    assert read == want, f"read {read} bytes; each used piece of each kind once is {want}"
    assert max(hi - lo for ps in opt.nvme.pieces for lo, hi in ps) == 1024
    t.engine.close()


def test_move_to_nvme_with_params_on_nvme_serves_params_from_the_file(tmp_path):
    """A policy move host -> NVMe writes the chunk's compute-dtype parameters to the file;
    the next gather's source is read back from it, equal to the master cast."""
    from tierlift.offload.optimizer import OffloadedOptimizer, Tier
    from tierlift.offload.policy import NVMeOffload, OffloadConfig
    from tierlift.parallel.config import OptimizerConfig
    from tierlift.layout import UnitSpec, plan_chunks

    units = [UnitSpec("", (("embed.weight", (64, 64)),)), UnitSpec("blocks.0", (("blocks.0.w", (96, 64)),))]
    layout = list(plan_chunks(units, 1, align_bytes=64))
    masters = [torch.randn(c.shard_numel) for c in layout]
    path = str(tmp_path / "nvme")
    opt = OffloadedOptimizer(layout, 0, list(masters), OptimizerConfig(grad_clip=0.0),
                             OffloadConfig(optimizer=NVMeOffload(path=path, max_in_cpu=10 ** 9, buffer_size=2048),
                                           param=NVMeOffload(path=path)),
                             torch.bfloat16, torch.device("cpu"), deferred=False)
    assert [hc.tier for hc in opt.chunks] == [Tier.HOST, Tier.HOST]
    assert opt.move_to_nvme([1]) == [1] and opt.chunks[1].param16 is None
    src = opt.wait_chunk(1)
    assert src.dtype == torch.bfloat16 and torch.equal(src, masters[1].to(torch.bfloat16))
    opt.release_source(1)
    opt.prefetch_source(1)  # read ahead, then handed out by wait_chunk without a second read
    opt.nvme.file.wait_all()
    reads = opt.nvme.file.stats().reads
    assert torch.equal(opt.wait_chunk(1), masters[1].to(torch.bfloat16))
    assert opt.nvme.file.stats().reads == reads
    opt.release_source(1)
    opt.prefetch_source(1)
    opt.drop_prefetched()  # an unused read ahead gives its slot back
    assert not opt.tiers.slots.held and not opt.tiers.slots.reads
    assert torch.equal(opt.wait_chunk(0), masters[0])  # host tier: the fp32 master itself
    opt.close()
