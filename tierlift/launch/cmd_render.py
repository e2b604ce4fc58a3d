"""`tierlift render slurm|k8s CONFIG ...`: cluster job files for a run.

Only parsing lives here; the templates are tierlift/launch/render_slurm.py and
render_k8s.py.  The result goes to stdout, or to ``--out`` (an existing file is
replaced only with ``--overwrite``).
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is less than {lo}")
        return v
    return parse


def _cmd_slurm(args: argparse.Namespace) -> int:
    from tierlift.launch.render_common import write_output
    from tierlift.launch.render_slurm import render_slurm

    text = render_slurm(args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, backend=args.backend,
                        device=args.device, partition=args.partition, time=args.time, account=args.account,
                        run_dir=args.run_dir)
    write_output(text, args.out, overwrite=args.overwrite)
    return 0


def _cmd_k8s(args: argparse.Namespace) -> int:
    from tierlift.launch.render_common import write_output
    from tierlift.launch.render_k8s import render_k8s

    text = render_k8s(args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image,
                      pvc=args.pvc, backoff_limit=args.backoff_limit)
    write_output(text, args.out, overwrite=args.overwrite)
    return 0


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="tierlift YAML or DeepSpeed JSON")
    p.add_argument("--nodes", type=_int_at_least(1), required=True, help="nodes (pods) to run on")
    p.add_argument("--gpus-per-node", type=_int_at_least(1), required=True,
                   help="GPUs per node; one rank per GPU")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def register(subparsers, common) -> None:
    """Add the `render` subcommand."""
    r = subparsers.add_parser("render", parents=[common], help="write a Slurm or KubeRay job for a run")
    rsub = r.add_subparsers(dest="render_command", metavar="TARGET", required=True)
    s = rsub.add_parser("slurm", parents=[common], help="an sbatch script (Ray or MPI mode)")
    _common_args(s)
    s.add_argument("--backend", choices=["ray", "mpi"], default="ray",
                   help="ray: a Ray cluster across the allocation; mpi: srun --mpi=pmi2 (default ray)")
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: --gpus-per-node CPU ranks per node and no GPUs requested (default cuda)")
    s.add_argument("--run-dir", help="run directory on storage every node sees (overrides run.dir)")
    s.add_argument("--partition", help="#SBATCH --partition")
    s.add_argument("--time", help="#SBATCH --time (e.g. 1-00:00:00)")
    s.add_argument("--account", help="#SBATCH --account")
    s.set_defaults(handler=_cmd_slurm)
    k = rsub.add_parser("k8s", parents=[common], help="a KubeRay RayJob (and a ConfigMap with the config)")
    _common_args(k)
    k.add_argument("--image", required=True, help="container image with tierlift (and Ray) installed")
    k.add_argument("--pvc", help="ReadWriteMany PersistentVolumeClaim for the run directory (checkpoints)")
    k.add_argument("--backoff-limit", type=_int_at_least(0), default=3,
                   help="times KubeRay resubmits a failed job; each retry resumes from the checkpoint (default 3)")
    k.set_defaults(handler=_cmd_k8s)
