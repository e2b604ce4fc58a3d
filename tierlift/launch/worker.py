"""One rank of ``tierlift train`` under the local launcher.

``python -m tierlift.launch.worker --run-dir DIR [--resume] [--max-steps N]``
reads the resolved config the CLI put in its environment (``TIERLIFT_RUN_CONFIG``,
YAML; so every rank trains the same config, even if the source file changes
meanwhile, and nothing in the run directory changes before the run is accepted)
or, without it, ``DIR/config.yaml``, and runs the training entry with the
torchrun variables the launcher set.
"""

from __future__ import annotations

import argparse
import os
import sys

from tierlift.errors import LaunchError, TierliftError
from tierlift.parallel.env import RANK_PREFIX_ENV

__all__ = ["main", "load_run_config", "is_peer_loss", "RUN_CONFIG_ENV", "PEER_LOST_EXIT"]

# Exit code of a rank whose only error is that a peer rank went away (it failed
# first, with its own message): the launcher prefers any other rank's code and
# prints this rank's traceback only under --debug.
PEER_LOST_EXIT = 3

# What gloo, NCCL and torch's TCPStore say when the process at the other end of a
# collective has exited (torch 2.x; gloo raises a plain RuntimeError).
_PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                      "Broken pipe", "NCCL communicator was aborted", "Connection refused")

RUN_CONFIG_ENV = "TIERLIFT_RUN_CONFIG"  # the resolved config as YAML, set by `tierlift train`


def load_run_config(run_dir: str) -> dict:
    """The resolved config from ``$TIERLIFT_RUN_CONFIG``, else ``run_dir/config.yaml``, as a dict."""
    import yaml

    text = os.environ.get(RUN_CONFIG_ENV)
    if text is not None:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise LaunchError("does not hold a YAML mapping.", setting=RUN_CONFIG_ENV, value=text[:80],
                              fix="start ranks with `tierlift train CONFIG`, which sets it.")
        return data
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise LaunchError("has no config.yaml.", setting="--run-dir", value=run_dir,
                          fix="start runs with `tierlift train CONFIG`, which writes it.")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise LaunchError("config.yaml does not hold a mapping.", setting="--run-dir", value=run_dir,
                          fix="rerun `tierlift train CONFIG --run-dir DIR` to rewrite it.")
    return data


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a peer rank's process is gone."""
    import torch.distributed as dist

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_LOSS_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierlift.launch.worker",
                                description="Run one rank of a tierlift training run (started by the launcher).")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    try:
        from tierlift.runtime.entry import run_training

        run_training(load_run_config(args.run_dir), args.run_dir, resume=args.resume, max_steps=args.max_steps)
    except TierliftError as exc:
        if os.environ.get(RANK_PREFIX_ENV) == "1":
            exc.rank = None  # the launcher already starts the line with "[rank N] "
        elif exc.rank is None and os.environ.get("RANK", "").isdigit():
            exc.rank = int(os.environ["RANK"])
        if args.debug:
            import traceback
            traceback.print_exc()
        print(f"tierlift: error: {exc.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A peer failed first and said why; this rank's gloo/NCCL traceback is noise.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_peer_loss(exc):
            if args.debug:
                import traceback
                traceback.print_exc()
            return PEER_LOST_EXIT
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
