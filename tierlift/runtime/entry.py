"""What every rank of ``tierlift train`` runs: build model and data from the
config, train, write the summary.  Launchers call :func:`run_training` with the
torchrun environment set."""

from __future__ import annotations

import logging
import os
from typing import Any

from tierlift.errors import CheckpointError, ConfigError
from tierlift.models import build_model
from tierlift.runtime.checkpoint import latest_checkpoint
from tierlift.runtime.config import TrainConfig
from tierlift.runtime.data import build_dataset
from tierlift.runtime.outdir import write_text_atomic
from tierlift.runtime.trainer import Trainer

__all__ = ["run_training"]

log = logging.getLogger("tierlift.entry")


def run_training(cfg_dict: dict[str, Any], run_dir: str, resume: bool = False,
                 max_steps: int | None = None) -> dict[str, Any]:
    cfg = TrainConfig.from_dict(cfg_dict)
    model = build_model(cfg.model, seed=cfg.train.seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or cfg.model.vocab_size
    train_data = build_dataset(cfg.data, vocab_size=vocab, split="train")
    eval_data = build_dataset(cfg.data, vocab_size=vocab, split="eval") if cfg.train.eval_every else None
    trainer = Trainer(model, cfg, train_data=train_data, eval_data=eval_data, run_dir=run_dir)
    if resume:
        ckpt = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        if ckpt is None:
            raise CheckpointError("has no complete checkpoint to resume from.", setting="--resume",
                                  value=run_dir, fix="drop --resume to start fresh, or point --run-dir at the "
                                                     "run you want to continue.")
        trainer.load(ckpt)  # collective: a refused checkpoint raises on every rank
    if trainer.rank == 0 and run_dir:
        # Only now, with the run accepted: a refused --resume leaves the old config.yaml.
        # trainer.cfg: batch sizes derived from the world size filled in (mpi: known only here).
        path = os.path.join(run_dir, "config.yaml")
        try:
            write_text_atomic(path, trainer.cfg.to_yaml())
        except OSError as exc:  # the peers stop quietly at their next collective (launch/worker.py)
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}.", setting="--run-dir", value=run_dir,
                              fix="free space there, or give a writable run directory.") from None
    summary = trainer.fit(max_steps=max_steps)
    if trainer.rank == 0 and summary.losses:
        log.info("done: %d steps, loss %.4f -> %.4f, %.0f tokens/s", summary.steps, summary.losses[0],
                 summary.losses[-1], summary.tokens_per_s)
    return summary.to_dict()
