"""One rank of ``tierlift train`` under the local launcher.

``python -m tierlift.launch.worker --run-dir DIR [--resume] [--max-steps N]``
reads the resolved ``DIR/config.yaml`` that the CLI wrote (so every rank trains
the same config, even if the source file changes meanwhile) and runs the
training entry with the torchrun variables the launcher set.
"""

from __future__ import annotations

import argparse
import os
import sys

from tierlift.errors import LaunchError, TierliftError

__all__ = ["main", "load_run_config"]


def load_run_config(run_dir: str) -> dict:
    """The resolved config the CLI wrote to ``run_dir/config.yaml``, as a dict."""
    import yaml

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
        if exc.rank is None and os.environ.get("RANK", "").isdigit():
            exc.rank = int(os.environ["RANK"])
        if args.debug:
            import traceback
            traceback.print_exc()
        print(f"tierlift: error: {exc.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
