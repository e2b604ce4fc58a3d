"""tierlift: train models far larger than GPU memory.

Parameters, gradients and optimizer state are sharded ZeRO-style across ranks in
flat chunks and tiered across GPU memory, pinned host memory and NVMe.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainConfig", "FitSummary", "CPUOffload", "NVMeOffload", "NoOffload", "TierliftError",
           "ConfigError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import tierlift` (and `tierlift --help`) must not import torch.
    if name in ("Trainer", "FitSummary"):
        from tierlift.runtime import trainer
        return getattr(trainer, name)
    if name == "TrainConfig":
        from tierlift.runtime.config import TrainConfig
        return TrainConfig
    if name in ("CPUOffload", "NVMeOffload", "NoOffload"):
        from tierlift.offload import policy
        return getattr(policy, name)
    if name in ("TierliftError", "ConfigError"):
        from tierlift import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'tierlift' has no attribute {name!r}")
