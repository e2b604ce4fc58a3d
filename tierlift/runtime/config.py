"""TrainConfig: the one config object, composed of the components' own configs.

Loads tierlift YAML and DeepSpeed JSON into the same object (see
``tierlift.runtime.deepspeed_compat``).  Strict: unknown keys are errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from tierlift._configbase import check, check_choice, from_dict, to_dict
from tierlift.errors import ConfigError
from tierlift.models.config import ModelConfig
from tierlift.offload.policy import OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.runtime.data.config import DataConfig
from tierlift.runtime.schedule import SchedulerConfig

__all__ = ["TrainConfig", "LoopConfig", "RunConfig"]


@dataclass
class LoopConfig:
    """The step loop.  micro_batch_size is per rank; one optimizer step consumes
    micro_batch_size * grad_accum_steps * world_size samples."""

    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 300
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    global_batch_size: int = 0  # 0 = derived; if set, must equal mbs * accum * world

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "log_every", "eval_batches",
                     "keep_checkpoints"):
            v = getattr(self, name)
            check(v >= 1, f"train.{name}", v, "must be >= 1.", "give a positive integer.")
        for name in ("eval_every", "checkpoint_every", "global_batch_size"):
            v = getattr(self, name)
            check(v >= 0, f"train.{name}", v, "must be >= 0.", "use 0 to disable.")


@dataclass
class RunConfig:
    """Where and how the run executes.  device: "auto" (cuda when available),
    "cpu" or "cuda"; backend: "ray" (local Ray, the default) or "local"
    (subprocesses); dir: the run directory (config, logs, metrics, checkpoints)."""

    dir: str = "runs/default"
    device: str = "auto"
    backend: str = "ray"
    nproc: int = 1
    master_port: int = 0  # 0 = pick a free port
    threads_per_rank: int = 0  # 0 = cores // local ranks

    def __post_init__(self) -> None:
        check_choice("run.device", self.device, ["auto", "cpu", "cuda"])
        check_choice("run.backend", self.backend, ["ray", "local"])
        check(self.nproc >= 1, "run.nproc", self.nproc, "must be >= 1.", "give the number of ranks.")
        check(0 <= self.master_port < 65536, "run.master_port", self.master_port,
              "must be a TCP port or 0.", "use 0 to pick a free port.")
        check(self.threads_per_rank >= 0, "run.threads_per_rank", self.threads_per_rank, "must be >= 0.", "use 0.")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.precision.compute == "fp16" and self.precision.reduce == "bf16":
            raise ConfigError("mixes fp16 compute with bf16 reduction.", setting="precision.reduce",
                              value="bf16", fix="use reduce: fp32 or fp16 with fp16 compute.")

    # -- loading -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """From a tierlift mapping, or a DeepSpeed one (detected by its keys)."""
        from tierlift.runtime.deepspeed_compat import is_deepspeed_config, from_deepspeed
        if is_deepspeed_config(data):
            return from_deepspeed(data)
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """Load tierlift YAML (.yaml/.yml) or DeepSpeed JSON (.json)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError("does not exist or is not a file.", setting="config", value=path,
                              fix="give the path of a tierlift YAML or DeepSpeed JSON config, "
                                  "e.g. configs/tiny-gpt.yaml.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith(".json"):
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            raise ConfigError(f"could not be parsed: {exc}", setting="config", value=path,
                              fix="fix the syntax error at the position shown.") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("must hold a mapping at the top level.", setting="config", value=path,
                              fix="write sections such as model:, train:, zero:.")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
