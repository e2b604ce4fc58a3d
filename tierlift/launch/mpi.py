"""``--backend mpi``: ranks started by ``mpiexec``/``mpirun``/``srun --mpi=pmi2``.

The MPI launcher has already started every rank; MPI is used only to agree on
the torchrun variables, then torch.distributed (gloo/NCCL) runs as with any
other launcher:

- RANK/WORLD_SIZE are MPI_COMM_WORLD's; LOCAL_RANK/LOCAL_WORLD_SIZE come from
  the node-local communicator (``Split_type(COMM_TYPE_SHARED)``), NODE_RANK is
  the index of the node's lowest global rank among all nodes' lowest ranks.
- Rank 0 picks MASTER_ADDR (127.0.0.1 when every rank is on one host, so a
  single-node job never listens on the network; else the address its host uses
  to reach another rank's host, or the user's MASTER_ADDR) and a free
  MASTER_PORT, and broadcasts both.

The world size is checked against the one the user asked for (``run.nproc`` /
``--nproc``): a launch without PMI (plain ``srun``, or no launcher at all)
gives N independent one-rank MPI worlds that would each train alone.

Sync points: every function here that takes ``comm`` is collective over it
(bcast/allgather); each rank must call them in the same order.  Errors every
rank sees alike are printed by rank 0 only; the other ranks exit 2 quietly.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Mapping

from tierlift.errors import LaunchError, TierliftError
from tierlift.launch.ports import resolve_master_port
from tierlift.parallel.env import DistEnv

__all__ = ["rendezvous", "train_mpi", "check_nnodes", "PeerError"]

_FIX_LAUNCH = "start the ranks with `mpiexec -n {n} tierlift train ... --backend mpi` or `srun --mpi=pmi2 ...`"


class PeerError(LaunchError):
    """Rank 0 failed and reported it; this rank only has to exit (code 2)."""


def _mpi():
    try:
        from mpi4py import MPI  # optional dependency: the `mpi` extra
    except ImportError as exc:
        raise LaunchError(f"needs mpi4py, which cannot be imported ({exc}).", setting="--backend", value="mpi",
                          fix="pip install 'tierlift[mpi]' (mpi4py, built against the MPI that starts the "
                              "ranks), or use --backend local|ray.") from None
    return MPI


def check_nnodes(world: int, nnodes: int | None, setting: str = "--nnodes") -> None:
    """``nnodes`` must split ``world`` ranks into equal nodes (LOCAL_WORLD_SIZE and
    the per-node memory budgets assume the same number of ranks on every node)."""
    if nnodes is None:
        return
    if nnodes < 1 or world % nnodes:
        raise LaunchError(f"does not divide the world of {world} rank(s) into equal nodes.", setting=setting,
                          value=nnodes, fix=f"use a divisor of {world} (ranks per node = {world} / nodes), "
                                            "or change --nproc.")


def _launcher_tasks(environ: Mapping[str, str]) -> int | None:
    """Tasks the process manager says it started, when it says so (srun sets
    SLURM_STEP_NUM_TASKS even without PMI; Hydra and Open MPI set theirs)."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def _check_size(size: int, expected: int, environ: Mapping[str, str], setting: str) -> None:
    if size == expected:
        return
    tasks = _launcher_tasks(environ)
    if size == 1 and tasks and tasks > 1 and "SLURM_PROCID" in environ and "PMI_SIZE" not in environ:
        why = (f"srun started {tasks} tasks without PMI, so each is its own 1-rank MPI world "
               f"instead of one world of {expected}.")
        fix = "run `srun --mpi=pmi2 ...` (see `srun --mpi=list`), or mpiexec inside the allocation."
    elif size == 1 and tasks is None:
        why = f"this process is a 1-rank MPI world (no MPI launcher started it), but {expected} ranks were asked."
        fix = _FIX_LAUNCH.format(n=expected) + ", or use --backend local to start the ranks from tierlift."
    else:
        why = f"the MPI launch has {size} ranks, but {expected} were asked."
        fix = f"launch {expected} ranks, or pass --nproc {size}."
    raise LaunchError(why, setting=setting, value=expected, fix=fix)


def _route_addr(peer_host: str) -> str | None:
    """This host's address on the route to ``peer_host`` (a UDP connect sends nothing)."""
    try:
        peer_ip = socket.gethostbyname(peer_host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer_ip, 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def _pick_master(hosts: list[str], environ: Mapping[str, str], master_port: int, port_setting: str):
    """(addr, port) chosen on rank 0."""
    if environ.get("MASTER_ADDR"):
        addr = environ["MASTER_ADDR"]  # the user's choice wins
    elif len(set(hosts)) == 1:
        addr = "127.0.0.1"
    else:
        peer = next(h for h in hosts if h != hosts[0])
        addr = _route_addr(peer)
        if addr is None:
            raise LaunchError(f"cannot find an address of rank 0's host {hosts[0]!r} that {peer!r} can reach.",
                              setting="MASTER_ADDR", value=None,
                              fix="export MASTER_ADDR=<rank 0's address on the cluster network> before launching.")
    # A port to bind on the wildcard address unless the job stays on loopback.
    bind = addr if addr.startswith("127.") else "0.0.0.0"
    return addr, resolve_master_port(master_port, bind, setting=port_setting)


def rank0_first(comm: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; the others wait and raise :class:`PeerError` if it failed.

    Collective: a bcast of rank 0's outcome (a bool, since an exception's
    setting/fix do not survive pickling through ``Exception.args``)."""
    failed, result = False, None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except TierliftError:
            comm.bcast(True, root=0)
            raise
    if comm.bcast(failed, root=0):
        raise PeerError("rank 0 reported an error.")
    return result


def rendezvous(expected_world: int, *, nnodes: int | None = None, master_port: int = 0,
               port_setting: str = "run.master_port", size_setting: str = "run.nproc",
               environ: Mapping[str, str] | None = None, comm: Any = None) -> DistEnv:
    """Agree on the torchrun variables over MPI and return them (not yet applied)."""
    environ = os.environ if environ is None else environ
    if comm is None:
        comm = _mpi().COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        check_nnodes(expected_world, nnodes)
        _check_size(size, expected_world, environ, size_setting)
    except LaunchError as exc:
        if rank == 0:  # every rank of this world sees the same values: one of them says so
            raise
        raise PeerError(exc.message) from None
    local = comm.Split_type(_mpi().COMM_TYPE_SHARED, key=rank)
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
        leader = local.bcast(rank, root=0)
    finally:
        local.Free()
    leaders = sorted(set(comm.allgather(leader)))
    hosts = comm.allgather(socket.gethostname())  # hosts[0] is rank 0's
    if nnodes is not None and len(leaders) != nnodes:
        err = LaunchError(f"the MPI launch spans {len(leaders)} node(s), but {nnodes} were asked.",
                          setting="--nnodes", value=nnodes,
                          fix=f"pass --nnodes {len(leaders)}, or place the ranks on {nnodes} node(s).")
        if rank == 0:
            raise err
        raise PeerError(err.message)
    picked = rank0_first(comm, lambda: _pick_master(hosts, environ, master_port, port_setting))
    addr, port = comm.bcast(picked, root=0)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=size, local_world_size=local_size,
                   master_addr=addr, master_port=port, node_rank=leaders.index(leader))


def _rendezvous_once(expected_world: int, **kw: Any) -> DistEnv:
    """:func:`rendezvous`, then MPI_Finalize: torch.distributed carries the job from
    here, and a rank that fails later must not leave the others blocked in
    MPI_Finalize at exit (gloo reports the lost peer instead)."""
    MPI = _mpi()
    try:
        env = rendezvous(expected_world, **kw)
    except TierliftError:
        raise  # raised on every rank alike (sizes, nodes, rank 0's broadcast outcome)
    except BaseException:
        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)  # a bug on one rank: the others are blocked in a collective
        raise
    MPI.Finalize()  # collective: every rank got here
    return env


def train_mpi(cfg: Any, *, report: Callable[[int, str], int], resume: bool, max_steps: int | None,
              nnodes: int | None, port_setting: str) -> int:
    """One rank of ``tierlift train --backend mpi``: rendezvous, then train in this
    process.  The CLI has checked the run directory on every rank before this
    (read-only; no rank passes the rendezvous before all have checked)."""
    from tierlift.runtime.entry import run_training

    run_dir = cfg.run.dir
    rank = None
    try:
        env = _rendezvous_once(cfg.run.nproc, nnodes=nnodes, master_port=cfg.run.master_port,
                               port_setting=port_setting)
        rank = env.rank
        env.apply()
        os.environ["TIERLIFT_RUN_DIR"] = run_dir
        run_training(cfg.to_dict(), run_dir, resume=resume, max_steps=max_steps)
    except PeerError:
        return 2
    except TierliftError as exc:
        if exc.rank is None and rank is not None and rank > 0:
            exc.rank = rank
            exc.args = (exc.render(),)  # the CLI prints str(exc)
        raise
    return report(0, run_dir) if rank == 0 else 0
