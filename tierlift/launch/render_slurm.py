"""``tierlift render slurm``: an sbatch script for a run on ``--nodes`` nodes.

Both modes write the resolved config next to the run (``RUN_DIR/job-config.yaml``,
so every node reads the same one from the shared run directory), pass
``--resume`` when the run directory holds a complete checkpoint (``#SBATCH
--requeue``: a job requeued after a node failure continues from it), and exit
with the training's exit code.

- mpi: ``srun --mpi=pmi2 python -m tierlift train --backend mpi``, one task per
  rank; tierlift.launch.mpi turns the PMI world into the torchrun variables.
- ray: a Ray head on the first node and one Ray node on each other node (srun
  steps running ``ray start --block``), a wait until all nodes joined, then
  ``tierlift train --backend ray --address HEAD:PORT`` on the first node.  The
  ports are a block of 100 derived from SLURM_JOB_ID (two jobs sharing a node
  differ unless their ids are equal mod 400), the Ray session directory is per
  job, token authentication is on with a fresh token per job, and an EXIT trap
  stops Ray on every node however the script ends (SIGTERM from scancel or a
  requeue included).
"""

from __future__ import annotations

import re
import shlex
import sys

from tierlift.errors import LaunchError
from tierlift.launch.render_common import Job, check_word, load_job, resume_test

__all__ = ["render_slurm"]

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_WAIT_NODES_S = 300  # how long the ray mode waits for every node to join

_HEADER = """#!/bin/bash
# Rendered by `tierlift render slurm`: {nodes} node(s) x {per_node} rank(s), --backend {backend}, device {device}.
# Submit with `sbatch THIS_FILE`.  The run directory must be on storage every node sees.
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
{sbatch_extra}#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

RUN_DIR={run_dir}
# The Python environment with tierlift installed (the one that rendered this script, unless overridden).
PY="${{TIERLIFT_PYTHON:-{python}}}"
CONFIG="$RUN_DIR/job-config.yaml"
mkdir -p "$RUN_DIR" || exit 2
cat > "$CONFIG.tmp-$SLURM_JOB_ID" <<'TIERLIFT_CONFIG_EOF'
{config}TIERLIFT_CONFIG_EOF
mv -f "$CONFIG.tmp-$SLURM_JOB_ID" "$CONFIG" || exit 2
# A requeued or resubmitted job continues from the newest complete checkpoint.
if {resume_test}; then RESUME=--resume; else RESUME=; fi
echo "tierlift: job $SLURM_JOB_ID (restart count ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST ${{RESUME:+(resuming)}}" >&2
"""

_MPI = """
# One task per rank; PMI-2 hands every task the MPI world (plain srun would start singletons).
srun --mpi=pmi2 --kill-on-bad-exit=1 "$PY" -m tierlift train "$CONFIG" --backend mpi --nnodes {nodes} $RESUME
exit $?
"""

_RAY = """
RAY=("$PY" -m ray.scripts.scripts)
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${{NODES[0]}}
HEAD_IP=${{TIERLIFT_HEAD_IP:-$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{{print $1}}')}}
# A block of 100 ports per job (SLURM_JOB_ID mod 400): Ray heads of jobs sharing a node do not collide.
BASE=$((20000 + (SLURM_JOB_ID % 400) * 100))
GCS="$HEAD_IP:$BASE"
PORTS=(--node-manager-port=$((BASE + 1)) --object-manager-port=$((BASE + 2)) --ray-client-server-port=$((BASE + 3))
       --dashboard-agent-grpc-port=$((BASE + 4)) --dashboard-agent-listen-port=$((BASE + 5))
       --metrics-export-port=$((BASE + 6)) --runtime-env-agent-port=$((BASE + 7))
       --min-worker-port=$((BASE + 10)) --max-worker-port=$((BASE + 99))
       --temp-dir="/tmp/ray-$SLURM_JOB_ID" --num-gpus={gpus})
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))') || exit 2
export RAY_AUTH_TOKEN
STEPS=()
stop_ray() {{
    srun --overlap --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 "${{RAY[@]}}" stop --force >/dev/null 2>&1
    [ ${{#STEPS[@]}} -eq 0 ] || kill "${{STEPS[@]}}" 2>/dev/null
    wait
}}
trap stop_ray EXIT
trap 'exit 143' TERM INT  # scancel / requeue: run the EXIT trap too

srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" "${{RAY[@]}}" start --head --block --node-ip-address="$HEAD_IP" \\
    --port=$BASE --include-dashboard=false "${{PORTS[@]}}" &
STEPS+=($!)
if [ {nodes} -gt 1 ]; then
    sleep 5  # the head's GCS first; workers retry anyway
    srun --overlap --nodes={workers} --ntasks={workers} --ntasks-per-node=1 --exclude="$HEAD" \\
        "${{RAY[@]}}" start --block --address="$GCS" "${{PORTS[@]}}" &
    STEPS+=($!)
fi
"$PY" - "$GCS" {nodes} {wait_s} <<'TIERLIFT_WAIT_EOF' || exit 1
import sys, time
import ray
addr, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
alive = 0
while time.monotonic() < deadline:
    try:
        if not ray.is_initialized():
            ray.init(address=addr, logging_level="ERROR", log_to_driver=False)
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive >= want:
            sys.exit(0)
    except Exception:  # the head not up yet (ConnectionError, timeouts): retry until the deadline
        pass
    time.sleep(2)
sys.exit(f"tierlift: error: only {{alive}} of {{want}} Ray nodes joined {{addr}} within {{sys.argv[3]}} s. "
         "Fix: check the srun steps' output above and that the nodes can reach the head's ports.")
TIERLIFT_WAIT_EOF

"$PY" -m tierlift train "$CONFIG" --backend ray --address "$GCS" --nnodes {nodes} --nproc-per-node {per_node} $RESUME
exit $?
"""


def _sbatch_lines(*, job: Job, partition: str | None, time: str | None, account: str | None) -> str:
    lines = []
    if job.device == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={job.ranks_per_node}")
    for flag, value in (("partition", partition), ("time", time), ("account", account)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    return "".join(line + "\n" for line in lines)


def render_slurm(config: str, *, nodes: int, gpus_per_node: int, backend: str = "ray", device: str = "cuda",
                 partition: str | None = None, time: str | None = None, account: str | None = None,
                 run_dir: str | None = None, python: str | None = None) -> str:
    """The sbatch script's text."""
    if backend not in ("ray", "mpi"):
        raise LaunchError("is not a Slurm mode.", setting="--backend", value=backend, fix="use ray or mpi.")
    if time is not None and not _TIME.match(time):
        raise LaunchError("is not a Slurm time limit.", setting="--time", value=time,
                          fix="use MINUTES, HH:MM:SS or DAYS-HH[:MM[:SS]], e.g. --time 2-00:00:00.")
    check_word("--partition", partition, "gpu")
    check_word("--account", account, "myproject")
    job = load_job(config, nodes=nodes, ranks_per_node=gpus_per_node, device=device, backend=backend,
                   run_dir=run_dir)
    if "TIERLIFT_CONFIG_EOF" in job.config_yaml:  # would end the here-document early
        raise LaunchError("contains the script's here-document marker.", setting="CONFIG", value=config,
                          fix="remove the text TIERLIFT_CONFIG_EOF from the config.")
    py = python or sys.executable
    text = _HEADER.format(nodes=nodes, per_node=gpus_per_node, backend=backend, device=device, name=job.name,
                          tasks_per_node=gpus_per_node if backend == "mpi" else 1,
                          sbatch_extra=_sbatch_lines(job=job, partition=partition, time=time, account=account),
                          run_dir=shlex.quote(job.run_dir), python=py.replace('"', '\\"').replace("$", "\\$"),
                          config=job.config_yaml, resume_test=resume_test('"$PY"', '"$RUN_DIR"'))
    if backend == "mpi":
        return text + _MPI.format(nodes=nodes)
    return text + _RAY.format(nodes=nodes, workers=nodes - 1, per_node=gpus_per_node, wait_s=_WAIT_NODES_S,
                              gpus=gpus_per_node if device == "cuda" else 0)
