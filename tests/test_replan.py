"""The policy re-plans a running job: injected host-memory pressure (a threshold
above what any machine has) moves optimizer state from host memory to NVMe at a
step boundary, without changing a single loss, on 1 and 2 CPU ranks; the decision
is in the telemetry Parquet and in the report."""

from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq
import pytest

from _dist import run_ranks
from _fakes import arith_samples

MODEL = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 8, "n_heads": 4, "max_seq_len": 16}
PRESSURE = {"host_min_available_bytes": 2 ** 50, "cooldown_steps": 4}  # 1 PiB "needed": always short


def _train(tmp: str, tag: str, policy: dict, run_dir: str | None = None):
    from tierlift import TrainConfig, Trainer
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    from tierlift.offload.optimizer import Tier

    rank = os.environ.get("RANK", "0")
    cfg = TrainConfig.from_dict({
        "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 4, "max_steps": 12},
        "optimizer": {"lr": 3.0e-3, "grad_clip": 0.5}, "zero": {"stage": 3}, "run": {"device": "cpu"},
        "offload": {"optimizer": {"kind": "nvme", "path": os.path.join(tmp, f"{tag}-{rank}"), "max_in_cpu": 10 ** 9,
                                  "buffer_count": 2}, "param": {"kind": "cpu"}},
        "policy": policy})
    t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg, train_data=arith_samples(256, seed=2), run_dir=run_dir)
    losses = t.fit().losses
    tiers = [hc.tier is Tier.NVME for hc in t.engine.host_opt.chunks]
    t.engine.close()
    return losses, tiers


def test_host_pressure_moves_state_to_nvme_without_changing_losses(tmp_path):
    ref, tiers_ref = _train(str(tmp_path), "ref", {"enabled": False})
    run = str(tmp_path / "run")
    got, tiers = _train(str(tmp_path), "pressured", PRESSURE, run_dir=run)
    assert not any(tiers_ref) and all(tiers), "every chunk's state should have moved to NVMe"
    assert got == ref  # bit-identical: moving state between tiers must not touch the numbers
    events = [e for f in glob.glob(os.path.join(run, "telemetry", "events-*.parquet"))
              for e in pq.read_table(f).to_pylist()]
    moves = [e for e in events if e["kind"] == "policy_move_to_nvme"]
    assert len(moves) == 1 and "host memory available" in moves[0]["detail"]
    from tierlift.runtime.report import build_report
    html = open(build_report(run), encoding="utf-8").read()
    assert "policy_move_to_nvme" in html


def _two_ranks(tmp):
    return _train(tmp, "ref", {"enabled": False}), _train(tmp, "pressured", PRESSURE)


@pytest.mark.slow
def test_two_ranks_take_the_same_decision(tmp_path):
    (ref, tiers_ref), (got, tiers) = run_ranks(_two_ranks, 2, str(tmp_path))
    assert not any(tiers_ref) and all(tiers)
    assert got == ref


def _stalls(tmp):
    """Stage 3 with no prefetch on 2 gloo ranks: every unit waits for its gather, the
    policy deepens prefetch (the same decision on both ranks), losses unchanged."""
    from tierlift import TrainConfig, Trainer
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig

    out = {}
    for tag, policy in (("off", {"enabled": False}),
                        ("on", {"stall_ms": 0.0, "stall_patience": 2, "cooldown_steps": 3, "max_prefetch": 3})):
        cfg = TrainConfig.from_dict({
            "model": MODEL, "data": {"seq_len": 16}, "train": {"micro_batch_size": 4, "max_steps": 12},
            "optimizer": {"lr": 3.0e-3}, "zero": {"stage": 3, "prefetch_units": 0}, "run": {"device": "cpu"},
            "policy": policy})
        run_dir = os.path.join(tmp, tag)  # one run directory for both ranks (shared checkpoints)
        t = Trainer(build_model(ModelConfig(**MODEL), seed=5), cfg, train_data=arith_samples(256, seed=2),
                    run_dir=run_dir)
        out[tag] = (t.fit().losses, t.engine.cfg.prefetch_units)
        t.engine.close()
    pattern = os.path.join(tmp, "on", "telemetry", f"events-rank-{os.environ['RANK']}-*.parquet")
    events = [e for f in glob.glob(pattern) for e in pq.read_table(f).to_pylist()]
    out["deeper"] = sorted(e["step"] for e in events if e["kind"] == "policy_prefetch_deeper")
    return out


@pytest.mark.slow
def test_stalls_deepen_prefetch_on_every_rank(tmp_path):
    out = run_ranks(_stalls, 2, str(tmp_path))
    (ref, depth_off), (got, depth_on) = out["off"], out["on"]
    assert depth_off == 0 and depth_on >= 2, (depth_off, depth_on)
    assert out["deeper"], "the decision must be in the telemetry"
    assert got == ref
