"""Config of the training and evaluation data sources."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tierlift._configbase import check, check_choice
from tierlift.errors import DataError

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """source: "synthetic" (random tokens with a learnable pattern, for
    benchmarks and tests) or "parquet" (a directory of token shards written by
    ``tierlift data prepare``).  seq_len: tokens per sample (the model sees
    seq_len inputs and seq_len next-token labels).  eval_path: optional held-out
    shards (its eval split if it has one, else all of it); without it, the eval
    split of ``path`` is used when ``prepare`` wrote one.  synthetic_samples /
    synthetic_eval_samples: sizes of the synthetic train and eval sets (eval
    draws from a separate seed stream; 0 = no synthetic eval)."""

    source: str = "synthetic"
    path: str = ""
    eval_path: str = ""
    seq_len: int = 128
    shuffle: bool = True
    seed: int = 0
    synthetic_samples: int = 1 << 16
    synthetic_eval_samples: int = 1024

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ["synthetic", "parquet"])
        check(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2.", "use e.g. 128.")
        check(self.synthetic_samples >= 1, "data.synthetic_samples", self.synthetic_samples,
              "must be >= 1.", "use e.g. 65536.")
        check(self.synthetic_eval_samples >= 0, "data.synthetic_eval_samples", self.synthetic_eval_samples,
              "must be >= 0.", "use e.g. 1024, or 0 for no synthetic eval set.")
        if self.source == "parquet":
            for key in ("path", "eval_path"):
                p = getattr(self, key)
                if key == "path" or p:
                    if not p or not os.path.isdir(p):
                        raise DataError("is not a directory of Parquet token shards.", setting=f"data.{key}",
                                        value=p, fix="run `tierlift data prepare TEXT... --out DIR` and point "
                                                     f"data.{key} at DIR.")
