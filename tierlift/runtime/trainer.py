"""The Trainer: the public step loop over the chunked ZeRO engine.

    trainer = Trainer(model, cfg, train_data=ds)
    summary = trainer.fit(max_steps=100)
    state = trainer.full_state_dict()
    model = trainer.unwrap_model()          # or: with trainer.gathered_parameters(): ...
    trainer.save(path); trainer = Trainer.resume(path, model, cfg, train_data=ds)

Inside a multi-process launch (torchrun env vars set) every rank builds the same
model and calls the same code; the Trainer creates the process group itself when
none exists.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tierlift.errors import CheckpointError, ConfigError, TierliftError
from tierlift.models.labels import apply_label_rule
from tierlift.parallel.comm import current_comm
from tierlift.parallel.env import init_distributed
from tierlift.parallel.zero import ZeroEngine
from tierlift.runtime.checkpoint import latest_checkpoint, load_checkpoint, rotate_checkpoints, save_checkpoint
from tierlift.runtime.checkpoint_check import check_trainer_extra
from tierlift.runtime.config import TrainConfig, config_choices, resolve_batch_sizes
from tierlift.runtime.data import StepBatcher
from tierlift.runtime.replan import Replanner
from tierlift.runtime.rundir import MemoryMeter, MetricsWriter, Progress, setup_logging, write_json_atomic
from tierlift.runtime.schedule import lr_at
from tierlift.system.telemetry import TelemetrySampler

__all__ = ["Trainer", "FitSummary"]

log = logging.getLogger("tierlift.trainer")


@dataclass
class FitSummary:
    """What ``fit`` measured.  ``losses``: one float per optimizer step (mean over
    ranks and micro-batches); ``step_times``: seconds per step (device-synchronised);
    ``tokens_per_s``: over the steps after the first (compile/warm-up excluded)."""

    start_step: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_step: int = 0
    tokens_per_s: float = 0.0
    peak_gpu_alloc_bytes: int = 0
    peak_gpu_reserved_bytes: int = 0
    peak_host_rss_bytes: int = 0
    pinned_bytes: int = 0
    world_size: int = 1
    offload_busy_s: dict[str, float] = field(default_factory=dict)  # host optimizer worker time by phase
    # GPU only, one per step, sampled at its end: device reserved - allocated (bytes), and what the
    # chunk arena took beyond its reservation (bytes; flat after the first step is its promise).
    gpu_frag_bytes: list[int] = field(default_factory=list)
    arena_growth_bytes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", out)
    if isinstance(out, dict):
        loss = out.get("loss")
    if not torch.is_tensor(loss):
        raise ConfigError("the model's forward returned no loss tensor.", setting="model", value=type(out).__name__,
                          fix="make forward(**batch) return a loss tensor or an object with .loss "
                              "(pass labels in the batch).")
    return loss


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train_data=None, eval_data=None,
                 run_dir: str | None = None) -> None:
        self.cfg = cfg
        self.device = init_distributed(cfg.run.device, threads_per_rank=cfg.run.threads_per_rank)
        self.comm = current_comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.run_dir = run_dir
        setup_logging(run_dir, self.rank)
        # Batch sizes a DeepSpeed config derives from the world size are fixed here, the first
        # place it is known; every value tierlift chose for "auto" / missing keys is logged once.
        self.cfg, chosen = resolve_batch_sizes(cfg, self.world_size)
        cfg = self.cfg
        if self.rank == 0:
            for line in config_choices(cfg) + chosen:
                log.info("%s", line)
        torch.manual_seed(cfg.train.seed + self.rank)  # dropout etc. differ per rank; weights come from the model
        self.model = model
        apply_label_rule(model, train_data)  # one label rule for built and passed-in HF models (models/labels.py)
        self.engine = ZeroEngine(model, cfg.zero, cfg.precision, cfg.optimizer, self.device,
                                 offload=cfg.offload, activations=cfg.train.activations)
        self.step = 0
        self._act_plan_saved = None  # the activation plan last written to run_dir/activations.json
        self.train_data = train_data
        self.eval_data = eval_data
        self.batcher = self._batcher(train_data, cfg.data.shuffle) if train_data is not None else None
        self.memory = MemoryMeter(self.device)

    def _batcher(self, data, shuffle: bool):
        t = self.cfg.train
        return StepBatcher(data, t.micro_batch_size, t.grad_accum_steps, self.rank, self.world_size,
                           seed=self.cfg.data.seed, shuffle=shuffle)

    # -- the loop ------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns its metrics."""
        t = self.cfg.train
        micro = self.batcher.next_step()
        lr = lr_at(self.step, self.cfg.optimizer.lr, self.cfg.scheduler, t.max_steps)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        self.model.train()
        self.engine.begin_step(lr)
        acts = self.engine.activations
        if acts is not None:
            acts.begin_step()
        for a, batch in enumerate(micro):
            batch = self._to_device(batch)
            tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
            self.engine.forward_begin()
            loss = _loss_of(self.model(**batch))
            loss_sum += loss.detach().to(torch.float64)
            self.engine.backward(loss / len(micro), sync_grads=a == len(micro) - 1)
        stats = self.engine.step(lr)
        act_metrics = acts.end_step() if acts is not None else {}
        if acts is not None and acts.plan is not self._act_plan_saved:
            self._act_plan_saved = acts.plan
            if self.run_dir and self.rank == 0:  # what `tierlift plan` prints for this run's activations
                write_json_atomic(os.path.join(self.run_dir, "activations.json"),
                                  {"step": self.step + 1, "plan": acts.plan.to_record(),
                                   "profiles": [dataclasses.asdict(p) for p in acts.profiles or ()]})
        # One scalar all-reduce: mean loss over ranks and micro-batches, and global tokens.
        packed = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(packed)
        loss_mean = float(packed[0]) / (len(micro) * self.world_size)
        if not math.isfinite(loss_mean) and not stats["skipped"]:
            raise TierliftError(f"loss became {loss_mean} at step {self.step}.", setting="optimizer.lr",
                                value=self.cfg.optimizer.lr, rank=self.rank,
                                fix="lower the learning rate, enable grad_clip, or use bf16 instead of fp16.")
        self.step += 1
        return {"loss": loss_mean, "lr": lr, "grad_norm": stats["grad_norm"], "tokens": float(packed[1]),
                "skipped": bool(stats["skipped"]), "loss_scale": stats["loss_scale"], **act_metrics}

    def fit(self, max_steps: int | None = None) -> FitSummary:
        """Train until optimizer step ``max_steps`` (default ``cfg.train.max_steps``)."""
        if self.batcher is None:
            raise ConfigError("no training data was given.", setting="train_data", value=None,
                              fix="pass train_data=... to Trainer (a dataset or list of dicts of tensors).")
        t = self.cfg.train
        total = max_steps if max_steps is not None else t.max_steps
        summary = FitSummary(start_step=self.step, world_size=self.world_size)
        metrics = MetricsWriter(self.run_dir if self.rank == 0 else None)
        bar = Progress(total, self.step, enabled=self.rank == 0)
        tele = self._telemetry().start()
        replanner = self._replanner()
        last_saved = None
        try:
            while self.step < total:
                self._sync()
                t0 = time.perf_counter()
                m = self.train_step()
                draining = self.step >= total and self.engine.steps_in_background
                # Memory facts (allocator counters, GPU) once a step's work is queued: on the last
                # step before the host optimizer's drain, which frees the gradient backlog at once;
                # on the others after the timing, which a pool snapshot would add to.
                arena = self.engine.arena_stats() if draining else None
                if draining:
                    # Host steps run on behind the next forward; the last step has no next
                    # forward, so its timing includes them (none escape the measurement).
                    self.engine.drain()
                self._sync()
                dt = time.perf_counter() - t0
                self.memory.pinned_bytes = self.engine.pinned_bytes
                if arena is None:
                    arena = self.engine.arena_stats()
                mem = {**self.memory.sample(), **arena}
                if "gpu_frag_bytes" in mem:
                    summary.gpu_frag_bytes.append(int(mem["gpu_frag_bytes"]))
                if "arena_growth_bytes" in mem:
                    summary.arena_growth_bytes.append(int(mem["arena_growth_bytes"]))
                tps = m["tokens"] / dt if dt > 0 else 0.0
                summary.losses.append(m["loss"])
                summary.step_times.append(dt)
                summary.lrs.append(m["lr"])
                summary.grad_norms.append(m["grad_norm"])
                summary.tokens_per_step = int(m["tokens"])
                row = {"step": self.step, **m, "step_time_s": dt, "tokens_per_s": tps, **mem}
                busy = self.engine.offload_timings()  # cumulative seconds the CPU optimizer spent per phase
                if busy is not None:
                    row.update({f"hostopt_{k}" + ("" if k.endswith("_gib") else "_s"): v for k, v in busy.items()})
                if t.eval_every and self.step % t.eval_every == 0 and self.eval_data is not None:
                    row["eval_loss"] = self.evaluate()
                    summary.eval_losses.append((self.step, row["eval_loss"]))
                tele.event("step_end", value=dt, step=self.step, step_time_s=dt, loss=m["loss"])
                row["prefetch_stall_ms"] = stall_ms = self.engine.take_stall_ms()
                row["hostopt_wait_ms"] = self.engine.take_host_wait_ms()  # overlap by design; not a stall
                for kind, n in self.engine.take_prefetch_counts().items():
                    row[f"prefetch_{kind}"] = n
                    if n:
                        tele.event(f"prefetch_{kind}", value=n, step=self.step)
                if stall_ms:
                    tele.event("prefetch_stall", value=stall_ms, step=self.step)
                decisions = (replanner.step_end(self.step, dt, mem["host_rss_bytes"], stall_ms)
                             if replanner else [])
                for d in decisions:
                    tele.event(f"policy_{d.kind}", step=self.step, reason=d.reason, **d.new_plan_fields)
                row["policy"] = ";".join(d.kind for d in decisions)  # every row: one Parquet schema
                metrics.add(row)
                bar.update(m["loss"], tps, mem)
                if self.rank == 0 and (self.step % t.log_every == 0 or self.step == total):
                    log.info("step %d/%d loss %.5f lr %.3g grad_norm %.3f %.0f tok/s", self.step, total, m["loss"],
                             m["lr"], m["grad_norm"], tps)
                if self.run_dir and t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    # Rows first: a committed checkpoint then always has its steps' metrics on disk,
                    # even when the job is killed (a Slurm requeue) right after the commit.
                    metrics.flush()
                    t_ck = time.perf_counter()
                    last_saved = self.save_to_run()
                    tele.event("checkpoint", value=time.perf_counter() - t_ck)
            if self.run_dir and last_saved != self.step and summary.losses:
                t_ck = time.perf_counter()
                self.save_to_run()
                tele.event("checkpoint", value=time.perf_counter() - t_ck)
        finally:
            bar.close()
            metrics.flush()
            tele.stop()
        summary.steps = len(summary.losses)
        timed = summary.step_times[1:] or summary.step_times
        if timed:
            summary.tokens_per_s = summary.tokens_per_step * len(timed) / sum(timed)
        for k, v in self.memory.peaks().items():
            setattr(summary, k, v)
        if self.engine.steps_in_background:
            summary.offload_busy_s = self.engine.offload_timings()
        if self.run_dir and self.rank == 0:
            write_json_atomic(os.path.join(self.run_dir, "summary.json"), summary.to_dict())
        return summary

    def _replanner(self):
        """The plan and the policy that revises it (``policy.enabled``), built once."""
        if not self.cfg.policy.enabled:
            return None
        if getattr(self, "_replan", None) is None:
            self._replan = Replanner(self.engine, self.cfg, self.world_size)
        return self._replan

    def _telemetry(self) -> TelemetrySampler:
        """One sampler per rank writing RUN_DIR/telemetry/ (disabled without a run dir),
        configured by the ``telemetry:`` section."""
        engine = self.engine
        return TelemetrySampler(self.run_dir, self.rank, int(os.environ.get("LOCAL_RANK", 0)), self.device,
                                self.cfg.telemetry, pinned_bytes=lambda: engine.pinned_bytes)

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float:
        """Mean loss over ``eval_batches`` global batches of the eval data (all ranks)."""
        if self.eval_data is None:
            raise ConfigError("no evaluation data was given.", setting="eval_data", value=None,
                              fix="pass eval_data=... to Trainer or set data.eval_path.")
        self.engine.rendezvous.check("evaluate", "trainer.evaluate()")  # one store round trip; see rendezvous.py
        batcher = self._batcher(self.eval_data, shuffle=False)
        n = max_batches or self.cfg.train.eval_batches
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(n):
            for batch in batcher.next_step():
                self.engine.forward_begin()
                total[0] += _loss_of(self.model(**self._to_device(batch))).to(torch.float64)
                total[1] += 1
                self.engine.forward_end_eval()
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1])

    # -- state ---------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 parameters on rank 0 (names as in model.state_dict());
        other ranks take part in the gather and get an empty dict.  All ranks call it
        (checked: a call on rank 0 alone fails after ``zero.rendezvous_timeout_s``)."""
        self.engine.rendezvous.check("full_state_dict", "trainer.full_state_dict()")
        return self.engine.full_state_dict()

    def unwrap_model(self, rank0_only: bool = False, device: torch.device | str | None = None) -> nn.Module:
        """The model as a plain module with full parameters of its own (values of
        ``full_state_dict()``, in the model's dtype, on ``device``, default the training
        device), on every rank or, with ``rank0_only``, on rank 0 (the others keep it
        sharded).  All ranks call it.  The next ``fit``/``evaluate`` re-binds the
        parameters to the trainer's state; edits to the unwrapped weights are not kept."""
        return self.engine.unwrap(rank0_only=rank0_only, device=device)

    def gathered_parameters(self):
        """``with trainer.gathered_parameters():`` every stage-3 parameter is gathered in
        place (compute dtype) for the block, so any rank may run a forward on its own
        (eval, generate); resharded on exit.  All ranks enter it; writes are not kept."""
        return self.engine.gathered_parameters()

    def _extra(self) -> dict:
        return {"step": self.step, "engine": self.engine.extra_state(),
                "data": self.batcher.state_dict() if self.batcher is not None else None,
                "world_size": self.world_size, "config": self.cfg.to_dict()}

    def save(self, path: str) -> str:
        """Write a sharded, atomic checkpoint to ``path`` (all ranks call this; a call on some
        ranks only fails after ``zero.rendezvous_timeout_s`` instead of hanging)."""
        self.engine.rendezvous.check("save", "trainer.save()")  # one store round trip per checkpoint
        rng = {"cpu_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        try:
            save_checkpoint(path, self.engine.state_segments(), comm=self.comm, extra=self._extra(),
                            rank_tensors=rng, aliases=self.engine.aliases())
        finally:
            self.engine.finish_state_segments(loaded=False)
        return path

    def save_to_run(self) -> int:
        parent = os.path.join(self.run_dir, "checkpoints")
        self.save(os.path.join(parent, f"step-{self.step:08d}"))
        if self.rank == 0:
            rotate_checkpoints(parent, self.cfg.train.keep_checkpoints)
        self.comm.barrier()
        return self.step

    def load(self, path: str) -> None:
        """Fill this trainer's state from a checkpoint (any world size)."""
        ckpt = latest_checkpoint(path) or path
        if not os.path.isdir(ckpt):
            raise CheckpointError("is not a checkpoint or a run directory with checkpoints.", setting="resume",
                                  value=path, fix="give a step-* checkpoint directory or a run directory.")
        extra, rank_tensors = load_checkpoint(ckpt, self.engine.state_segments(), comm=self.comm,
                                              check_extra=check_trainer_extra)
        self.engine.load_extra_state(extra["engine"])
        self.step = int(extra["step"])
        if self.batcher is not None and extra.get("data") is not None:
            self.batcher.load_state_dict(extra["data"])
        if not rank_tensors:  # resumed at another world size: no per-rank RNG state to restore
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.step + self.rank)
        if "cpu_rng" in rank_tensors:
            torch.set_rng_state(rank_tensors["cpu_rng"])
        if "cuda_rng" in rank_tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(rank_tensors["cuda_rng"], self.device)
        log.info("resumed from %s at step %d", ckpt, self.step)

    @classmethod
    def resume(cls, path: str, model: nn.Module, cfg: TrainConfig, train_data=None, eval_data=None,
               run_dir: str | None = None) -> "Trainer":
        trainer = cls(model, cfg, train_data=train_data, eval_data=eval_data, run_dir=run_dir)
        trainer.load(path)
        return trainer
