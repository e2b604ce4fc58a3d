"""DeepSpeed JSON -> tierlift YAML (``tierlift config convert``).

Above both ``runtime.config`` and ``deepspeed_compat``: it loads through
``TrainConfig.from_deepspeed`` and renders with ``render_config``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from tierlift.errors import ConfigError
from tierlift.runtime.config import TrainConfig, read_config_file, render_config, require_batch_sizes
from tierlift.runtime.deepspeed_compat import is_deepspeed_config

__all__ = ["to_tierlift_yaml", "convert_file"]


def to_tierlift_yaml(d: Mapping[str, Any], source: str | None = None, *, world_size: int | None = None,
                     where: str = "a conversion without a world size") -> str:
    """DeepSpeed config ``d`` as a complete tierlift YAML (every default shown), its
    header naming ``source`` and listing the mapping notes and the values chosen
    for "auto".  Loads back equal.  A batch size that depends on the number of
    ranks needs ``world_size`` (refused naming ``where`` without it)."""
    cfg = TrainConfig.from_deepspeed(d, world_size=world_size)
    if world_size is None:
        require_batch_sizes(cfg, where)
    return render_config(cfg, source or "DeepSpeed config (mapped)")


def convert_file(ds_json_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                 overwrite: bool = False, world_size: int | None = None) -> str:
    """Convert a DeepSpeed JSON file to tierlift YAML; returns the YAML text and, if
    ``out_path`` is given, writes it there (never over an existing file unless
    ``overwrite``)."""
    src = os.fspath(ds_json_path)
    data = read_config_file(src)
    if not is_deepspeed_config(data):
        raise ConfigError("is not a DeepSpeed config: none of its top-level keys (such as zero_optimization, "
                          "train_micro_batch_size_per_gpu, bf16) are DeepSpeed's.", setting="config", value=src,
                          fix="give a DeepSpeed JSON; a tierlift YAML needs no conversion.")
    text = to_tierlift_yaml(data, src, world_size=world_size, where="`tierlift config convert`")
    if out_path is not None:
        dst = os.fspath(out_path)
        if os.path.exists(dst) and not overwrite:
            raise ConfigError("already exists; it was not overwritten.", setting="out", value=dst,
                              fix="choose another output path, or allow overwriting "
                                  "(overwrite=True; CLI: --overwrite).")
        if os.path.isdir(dst):
            raise ConfigError("is a directory.", setting="out", value=dst, fix="give a file path such as run.yaml.")
        parent = os.path.dirname(os.path.abspath(dst))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{dst}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:  # write then rename: no half-written config
            f.write(text)
        os.replace(tmp, dst)
    return text
