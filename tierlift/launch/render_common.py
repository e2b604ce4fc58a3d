"""What ``tierlift render slurm|k8s`` share: the validated job, its name, the
resume test, and writing the result without losing an existing file.

The rendered job carries the resolved config (every default filled in, with
``run.nproc``/``run.backend``/``run.device`` set for the cluster), so it does not
depend on where the source config was at render time.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass

from tierlift.errors import LaunchError

__all__ = ["Job", "load_job", "job_name", "resume_test", "write_output", "check_word"]

# A shell word Slurm takes as a partition/account name: nothing the script would
# have to quote, so the #SBATCH line means what it says.
_WORD = re.compile(r"^[A-Za-z0-9_.,+-]+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Job:
    """One training job as the templates need it."""

    name: str  # DNS-1123 label, also the Slurm job name
    nodes: int
    ranks_per_node: int  # one per GPU; CPU ranks with device "cpu"
    device: str  # "cuda" or "cpu"
    run_dir: str  # absolute; must be on storage every node sees
    config_yaml: str  # the resolved config, as the ranks will train it
    nvme_paths: tuple[str, ...]  # the NVMe tier's node-local directories

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def job_name(run_dir: str) -> str:
    """A name Kubernetes and Slurm both accept: the run dir's last part, lower-cased,
    other characters as '-', at most 47 characters (KubeRay appends suffixes to
    the RayJob name for its cluster and pods, which must stay <= 63)."""
    base = os.path.basename(os.path.normpath(run_dir)).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:47].strip("-")
    return name if name and name[0].isalpha() else f"tierlift-{name}".strip("-")[:47]


def check_word(setting: str, value: str | None, example: str) -> None:
    if value is not None and not _WORD.match(value):
        raise LaunchError("must be a plain name (letters, digits, _ . , + -).", setting=setting, value=value,
                          fix=f"give the name as Slurm/Kubernetes shows it, e.g. {setting} {example}.")


def check_dns_label(setting: str, value: str | None) -> None:
    if value is not None and (len(value) > 63 or not _DNS_LABEL.match(value)):
        raise LaunchError("is not a Kubernetes name (lower-case letters, digits and '-', at most 63).",
                          setting=setting, value=value, fix=f"use the name `kubectl get {setting[2:]}` shows.")


def load_job(config: str, *, nodes: int, ranks_per_node: int, device: str, backend: str,
             run_dir: str | None = None, run_root: str | None = None) -> Job:
    """Load and validate ``config`` for a job of ``nodes`` x ``ranks_per_node`` ranks.
    ``run_root``: put the run directory at ``run_root/<name>`` (a path inside the
    job's containers) instead of ``run_dir`` (default: the config's ``run.dir``)."""
    from tierlift._configbase import from_dict
    from tierlift.offload.policy import NVMeOffload
    from tierlift.runtime.config import TrainConfig

    world = nodes * ranks_per_node
    cfg = TrainConfig.load(config, world_size=world)
    data = cfg.to_dict()
    data["run"].update(nproc=world, backend=backend, device=device)
    data["run"]["dir"] = os.path.abspath(run_dir or data["run"]["dir"])
    if run_root is not None:
        data["run"]["dir"] = posixpath.join(run_root, job_name(data["run"]["dir"]))
    cfg = from_dict(TrainConfig, data)  # re-validated for this world and backend
    nvme = tuple(sorted({p.path for p in (cfg.offload.optimizer, cfg.offload.param) if isinstance(p, NVMeOffload)}))
    return Job(name=job_name(cfg.run.dir), nodes=nodes, ranks_per_node=ranks_per_node, device=device,
               run_dir=cfg.run.dir, config_yaml=cfg.to_yaml(), nvme_paths=nvme)


def resume_test(python: str, run_dir: str) -> str:
    """A shell condition, true when ``run_dir`` holds a complete checkpoint (the
    same test ``tierlift train --resume`` applies), so a requeued or resubmitted
    job continues and a fresh one starts."""
    code = ("import sys; from tierlift.runtime.checkpoint import latest_checkpoint; "
            "sys.exit(0 if latest_checkpoint(sys.argv[1]) else 1)")
    return f"{python} -c {shlex.quote(code)} {run_dir}"


def write_output(text: str, out: str | None, *, overwrite: bool, setting: str = "--out") -> None:
    """``text`` to stdout, or to ``out`` (atomically; an existing file only with --overwrite)."""
    from tierlift.runtime.outdir import write_text_atomic

    if out is None:
        sys.stdout.write(text)
        return
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise LaunchError("is a directory.", setting=setting, value=out, fix="name the file to write.")
    if os.path.exists(out) and not overwrite:
        raise LaunchError("already exists.", setting=setting, value=out,
                          fix="add --overwrite to replace it, or choose another file.")
    if not os.path.isdir(os.path.dirname(out)):
        raise LaunchError("is in a directory that does not exist.", setting=setting, value=out,
                          fix="create the directory first, or choose another path.")
    write_text_atomic(out, text)
    print(f"tierlift: wrote {out}", file=sys.stderr)
