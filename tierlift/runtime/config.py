"""TrainConfig: the one config object, composed of the components' own configs.

Loads tierlift YAML and DeepSpeed JSON into the same object (see
``tierlift.runtime.deepspeed_compat``).  Strict: unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Mapping

from tierlift._configbase import check, check_choice, from_dict, to_dict
from tierlift.errors import ConfigError
from tierlift.models.config import ModelConfig
from tierlift.offload.policy import NoOffload, NVMeOffload, OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.runtime.data.config import DataConfig
from tierlift.runtime.deepspeed_compat import is_deepspeed_config, map_deepspeed
from tierlift.runtime.loop_config import LoopConfig, resolve_loop
from tierlift.runtime.policy import PolicyConfig
from tierlift.system.telemetry import TelemetryConfig
from tierlift.runtime.schedule import SchedulerConfig

# Not fields (ignored by ==): where a config came from and what its DeepSpeed mapping decided.
_CARRIED = ("_source", "_deepspeed_notes", "_deepspeed_choices")

__all__ = ["TrainConfig", "LoopConfig", "RunConfig", "check_batch_sizes", "resolve_batch_sizes",
           "require_batch_sizes", "config_choices", "render_config", "read_config_file"]


@dataclass
class RunConfig:
    """Where and how the run executes.  device: "auto" (cuda when available),
    "cpu" or "cuda"; backend: "ray" (local Ray, the default), "local"
    (subprocesses) or "mpi" (ranks started by mpiexec/srun, tierlift.launch.mpi);
    dir: the run directory (config, logs, metrics, checkpoints)."""

    dir: str = "runs/default"
    device: str = "auto"
    backend: str = "ray"
    nproc: int = 1
    master_port: int = 0  # 0 = pick a free port
    threads_per_rank: int = 0  # 0 = cores // local ranks

    def __post_init__(self) -> None:
        check_choice("run.device", self.device, ["auto", "cpu", "cuda"])
        check_choice("run.backend", self.backend, ["ray", "local", "mpi"])
        check(self.nproc >= 1, "run.nproc", self.nproc, "must be >= 1.", "give the number of ranks.")
        check(0 <= self.master_port < 65536, "run.master_port", self.master_port,
              "must be a TCP port or 0.", "use 0 to pick a free port.")
        check(self.threads_per_rank >= 0, "run.threads_per_rank", self.threads_per_rank, "must be >= 0.", "use 0.")


@dataclass
class TrainConfig:
    """The whole run's config: one section per component (``tierlift config show``
    prints every default).

    Defaults that differ from a plain ``torch.optim.AdamW`` loop (they follow
    GPT-style pretraining): lr 3e-4 (torch: 1e-3), betas (0.9, 0.95) (torch:
    (0.9, 0.999)), weight decay 0.1 (torch: 0.01) and none on 1-D parameters
    (torch: every parameter), global-norm clipping at 1.0 (torch: none), a cosine
    schedule down to 0.1 x lr (torch: constant) and shuffled data (a reference
    that reads its data in order: not shuffled).  These settings give plain AdamW
    behaviour (a DeepSpeed JSON config already loads with DeepSpeed's own
    defaults)::

        optimizer: {lr: 1.0e-3, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.01, decay_1d: true, grad_clip: 0}
        scheduler: {kind: constant}
        data: {shuffle: false}
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Rules that span sections; each section validates its own values.
        if self.precision.compute == "fp16" and self.precision.reduce == "bf16":
            raise ConfigError("mixes fp16 compute with bf16 reduction.", setting="precision.reduce",
                              value="bf16", fix="use reduce: fp32 or fp16 with fp16 compute.")
        if not isinstance(self.offload.param, NoOffload):
            # Only stage 3 keeps a parameter shard per rank that can live off the GPU.
            check(self.zero.stage == 3, "zero.stage", self.zero.stage,
                  f"offloading parameters (offload.param kind {type(self.offload.param).KIND!r}) "
                  "needs ZeRO stage 3.", "set zero.stage: 3, or offload.param: {kind: none}.")
        # Which optimizer tier offloaded parameters need is OffloadConfig's rule
        # (offload/policy.py, params_offload_error); this one spans sections.
        if self.model.kind == "hf":
            limit = self.model.hf_config.get("max_position_embeddings")
            if isinstance(limit, int) and not isinstance(limit, bool):
                check(self.data.seq_len <= limit, "data.seq_len", self.data.seq_len,
                      f"exceeds model.hf_config.max_position_embeddings={limit}.",
                      f"use seq_len <= {limit} or raise max_position_embeddings.")
        else:
            check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len", self.data.seq_len,
                  f"exceeds model.max_seq_len={self.model.max_seq_len}.",
                  f"use seq_len <= {self.model.max_seq_len} or raise model.max_seq_len.")
        for role in ("optimizer", "param"):
            policy = getattr(self.offload, role)
            if isinstance(policy, NVMeOffload) and policy.aio.use_gds:
                check(self.run.device != "cpu", f"offload.{role}.aio.use_gds", True,
                      "GPUDirect Storage moves data to a GPU, but run.device is 'cpu'.",
                      "set use_gds: false or run.device: cuda.")

    # -- loading -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """From a tierlift mapping, or a DeepSpeed one (detected by its keys)."""
        if is_deepspeed_config(data):
            return cls.from_deepspeed(data)
        return from_dict(cls, data)

    @classmethod
    def from_deepspeed(cls, data: Mapping[str, Any], *, world_size: int | None = None,
                       notes: list[str] | None = None) -> "TrainConfig":
        """From DeepSpeed config ``data`` (see ``deepspeed_compat.map_deepspeed``):
        ``world_size``, when known, fixes batch sizes DeepSpeed derives from it
        (else they are left to derive at launch: train.micro_batch_size 0);
        ``notes`` receives the mapping notes.  The values tierlift chose for
        "auto" or missing keys ride on the result (``_deepspeed_choices``), as
        the notes do (``_deepspeed_notes``): not fields, ignored by ==."""
        return map_deepspeed(data, cls, world_size=world_size, notes=notes)

    @classmethod
    def load(cls, path: str | os.PathLike, *, world_size: int | None = None) -> "TrainConfig":
        """Load tierlift YAML (.yaml/.yml) or DeepSpeed JSON (.json); ``world_size``
        as in :meth:`from_deepspeed`."""
        path = os.fspath(path)
        data = read_config_file(path)
        cfg = cls.from_deepspeed(data, world_size=world_size) if is_deepspeed_config(data) else cls.from_dict(data)
        cfg._source = path  # not a field: for render_config's header only, ignored by ==
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        import yaml

        class _Dumper(yaml.SafeDumper):
            """Block mappings, but lists on one line ([0.9, 0.95]) as people write them."""

        _Dumper.add_representer(list, lambda d, v: d.represent_sequence(
            "tag:yaml.org,2002:seq", v, flow_style=True))
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML (.yaml/.yml, or any other name) or JSON (.json) file."""
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
                          fix="write sections such as model:, train:, zero: (or a DeepSpeed JSON object).")
    return dict(data)


def check_batch_sizes(cfg: TrainConfig, world_size: int) -> int:
    """The samples one optimizer step consumes across ``world_size`` ranks.

    Pure; the trainer calls it once the world size is known.  Raises ConfigError
    when train.global_batch_size is set (> 0) and differs from
    micro_batch_size * grad_accum_steps * world_size.
    """
    check(isinstance(world_size, int) and world_size >= 1, "world_size", world_size,
          "must be a positive integer.", "pass the number of ranks.")
    t = resolve_loop(cfg.train, world_size)[0]  # a derived (0) micro-batch / accumulation filled in
    derived = t.micro_batch_size * t.grad_accum_steps * world_size
    if t.global_batch_size and t.global_batch_size != derived:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step == 0:
            fix = (f"set train.grad_accum_steps: {t.global_batch_size // per_step}, "
                   f"or train.global_batch_size: 0 to derive it.")
        else:
            fix = (f"make global_batch_size a multiple of micro_batch_size * world_size = {per_step}, "
                   f"e.g. {derived}, or set it to 0 to derive it.")
        raise ConfigError(
            f"!= micro_batch_size {t.micro_batch_size} * grad_accum_steps {t.grad_accum_steps} "
            f"* world_size {world_size} = {derived}.", setting="train.global_batch_size",
            value=t.global_batch_size, fix=fix)
    return derived


def resolve_batch_sizes(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with the batch sizes left to derive at launch (train.micro_batch_size
    / grad_accum_steps 0, e.g. a DeepSpeed config with train_batch_size but no
    micro-batch) filled in for ``world_size`` ranks, checked, and one line per
    value chosen.  The Trainer and ``tierlift train`` call it once the world size
    is known.  Pure."""
    check_batch_sizes(cfg, world_size)
    loop, lines = resolve_loop(cfg.train, world_size)
    if not lines:
        return cfg, []
    out = dataclasses.replace(cfg, train=loop)
    for attr in _CARRIED:
        if hasattr(cfg, attr):
            setattr(out, attr, getattr(cfg, attr))
    return out, lines


def require_batch_sizes(cfg: TrainConfig, where: str) -> None:
    """Refuse ``cfg`` where the world size is not known (``where``: the command)
    but a batch size depends on it."""
    t = cfg.train
    for name, ds_name in (("micro_batch_size", "train_micro_batch_size_per_gpu"),
                          ("grad_accum_steps", "gradient_accumulation_steps")):
        check(getattr(t, name) != 0, f"train.{name}", 0,
              f"is derived from train.global_batch_size={t.global_batch_size} (DeepSpeed: {ds_name} missing or "
              f"'auto' with train_batch_size set), which depends on the number of ranks, and {where} does not "
              "know it.", f"pass --world-size N (the ranks you will train on), or give {ds_name} in the config.")


def config_choices(cfg: TrainConfig) -> list[str]:
    """One line per value tierlift chose for a DeepSpeed key given as "auto" or missing."""
    return list(getattr(cfg, "_deepspeed_choices", None) or [])


def render_config(cfg: TrainConfig, source: str | None = None) -> str:
    """The resolved config as YAML with every default shown, under a header
    naming where it came from (``source``, else the file it was loaded from) and
    any notes of a DeepSpeed mapping.  Loading the text gives an equal config."""
    source = source or getattr(cfg, "_source", None) or "defaults (no config file)"
    lines = ["# tierlift config, resolved: every setting shown, defaults included.",
             f"# source: {source}"]
    notes = getattr(cfg, "_deepspeed_notes", None) or []
    if notes:
        lines.append("# mapped from DeepSpeed JSON; notes:")
        for note in notes:
            wrapped = textwrap.wrap(note, width=96) or [""]
            lines.append(f"#   - {wrapped[0]}")
            lines.extend(f"#     {rest}" for rest in wrapped[1:])
    chosen = config_choices(cfg)
    if chosen:
        lines.append('# values tierlift chose for DeepSpeed keys given as "auto" or missing:')
        lines.extend(f"#   {line}" for line in chosen)
    return "\n".join(lines) + "\n" + cfg.to_yaml()
