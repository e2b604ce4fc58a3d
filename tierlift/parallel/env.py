"""How a rank joins the job: the torchrun environment convention and process-group set-up.

Every launcher (local subprocesses, Ray, later srun/mpirun) hands each rank the
same variables torchrun sets: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, plus NODE_RANK/GROUP_RANK.  Code written for torchrun,
Accelerate or Lightning therefore runs unchanged, and tierlift reads its place
in the job only through :class:`DistEnv`.

``init_distributed`` creates the default group with ``backend_for(device)``
("cuda:nccl,cpu:gloo" on GPU so CPU-resident state never meets an NCCL-only
group; gloo on CPU).  When MASTER_ADDR is a loopback address (a single-node job)
rank 0 binds the rendezvous store to that address itself: torch's TCPStore, left
to ``env://``, listens on every interface ("::"), which would expose the store
to the network for a job that never leaves the machine.

The launchers (``tierlift.launch``) write this environment and the ranks' code (the
Trainer) reads it, so it lives here, below both (docs/architecture.md).
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from tierlift.errors import LaunchError

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "usable_cores", "is_loopback", "backend_for",
           "DEFAULT_TIMEOUT_S", "RANK_PREFIX_ENV"]

# Set in a rank's environment when the launcher prefixes its console lines with
# "[rank N] " (more than one rank), so the rank's own log format leaves the rank out.
RANK_PREFIX_ENV = "TIERLIFT_CONSOLE_RANK_PREFIX"

# Collectives may legitimately stall for minutes (rank 0 writing a checkpoint to
# NVMe while the others wait at a barrier), so the default is generous; a dead
# peer is still reported rather than hanging forever.
DEFAULT_TIMEOUT_S = 1800

_FIX_ENV = ("start the script through `tierlift launch` (or torchrun), which sets RANK, LOCAL_RANK, "
            "WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.")

# Whether this module created the default group (so shutdown_distributed does
# not tear down a group that Ray Train or the user owns).
_owns_group = False


def is_loopback(host: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1.  Names (even "localhost")
    are False: they may resolve to either family, so nothing may be bound to one
    specific loopback address on their behalf."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def backend_for(device: torch.device) -> str:
    """The default group's backend: CPU-resident tensors never meet an NCCL-only group."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def usable_cores() -> int:
    """CPU cores this process may run on (affinity / cpuset aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None:
        raise LaunchError("is not set.", setting=name, value=None, fix=_FIX_ENV)
    try:
        return int(raw)
    except ValueError:
        raise LaunchError("must be an integer.", setting=name, value=raw, fix=_FIX_ENV) from None


@dataclass(frozen=True)
class DistEnv:
    """One rank's place in the job, as torchrun describes it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    node_rank: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, value: object, why: str) -> LaunchError:
            return LaunchError(why, setting=name, value=value, fix=_FIX_ENV)

        if self.world_size < 1:
            raise bad("WORLD_SIZE", self.world_size, "must be >= 1.")
        if not 0 <= self.rank < self.world_size:
            raise bad("RANK", self.rank, f"must be in [0, WORLD_SIZE={self.world_size}).")
        if not 1 <= self.local_world_size <= self.world_size:
            raise bad("LOCAL_WORLD_SIZE", self.local_world_size, f"must be in [1, WORLD_SIZE={self.world_size}].")
        if not 0 <= self.local_rank < self.local_world_size:
            raise bad("LOCAL_RANK", self.local_rank, f"must be in [0, LOCAL_WORLD_SIZE={self.local_world_size}).")
        if self.node_rank < 0:
            raise bad("NODE_RANK", self.node_rank, "must be >= 0.")
        if not self.master_addr:
            raise bad("MASTER_ADDR", self.master_addr, "must name the host of rank 0.")
        if not 0 < self.master_port < 65536:
            raise bad("MASTER_PORT", self.master_port, "must be a TCP port in 1..65535.")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, allow_single: bool = False) -> "DistEnv":
        """Read and validate the torchrun variables.

        With ``allow_single``, an environment without any of RANK/WORLD_SIZE
        (a plain ``python train.py``) is a one-process job rather than an error.
        NODE_RANK falls back to torchrun's GROUP_RANK, then to RANK // LOCAL_WORLD_SIZE.
        """
        environ = os.environ if environ is None else environ
        if allow_single and "RANK" not in environ and "WORLD_SIZE" not in environ:
            return cls()
        rank = _int_var(environ, "RANK")
        local_rank = _int_var(environ, "LOCAL_RANK")
        world_size = _int_var(environ, "WORLD_SIZE")
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE")
        master_port = _int_var(environ, "MASTER_PORT")
        master_addr = environ.get("MASTER_ADDR")
        if master_addr is None:
            raise LaunchError("is not set.", setting="MASTER_ADDR", value=None, fix=_FIX_ENV)
        if "NODE_RANK" in environ:
            node_rank = _int_var(environ, "NODE_RANK")
        elif "GROUP_RANK" in environ:
            node_rank = _int_var(environ, "GROUP_RANK")
        else:
            node_rank = rank // max(1, local_world_size)
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size,
                   master_addr=master_addr, master_port=master_port, node_rank=node_rank)

    def to_environ(self) -> dict[str, str]:
        """The variables to put into a rank's environment (strings, torchrun names)."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
        }

    def apply(self, environ: MutableMapping[str, str] | None = None) -> None:
        (os.environ if environ is None else environ).update(self.to_environ())


def _resolve_device(device: str, env: DistEnv):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise LaunchError("is not a valid device.", setting="run.device", value=device,
                          fix="use auto, cpu or cuda.")
    if not torch.cuda.is_available():
        raise LaunchError("CUDA is not available in this process.", setting="run.device", value=device,
                          fix="use --device cpu (or auto), or run on a machine with a CUDA GPU and a CUDA build "
                              "of torch.")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise LaunchError(f"this node has {count} visible GPU(s) but LOCAL_RANK is {env.local_rank}.",
                          setting="run.nproc", value=env.local_world_size,
                          fix=f"start at most {count} ranks per node, or check CUDA_VISIBLE_DEVICES.")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def _loopback_store(env: DistEnv, timeout: datetime.timedelta):
    """A TCPStore whose server socket is bound to the loopback MASTER_ADDR.

    Sync point: rank 0 binds and listens before constructing the store; the
    other ranks' client constructors retry until it answers (up to ``timeout``).
    """
    import torch.distributed as dist

    addr, port = env.master_addr, env.master_port
    if env.rank != 0:
        return dist.TCPStore(addr, port, env.world_size, False, timeout)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(128, 2 * env.world_size))
    except OSError as exc:
        sock.close()
        raise LaunchError(f"rank 0 cannot listen on {addr}:{port}: {exc.strerror}.", setting="MASTER_PORT",
                          value=port, fix="choose another port or 0 to pick a free one.") from None
    # The store takes ownership of the descriptor (detach: Python must not close it).
    return dist.TCPStore(addr, port, env.world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def init_distributed(device: str = "auto", *, threads_per_rank: int = 0,
                     timeout_s: float = DEFAULT_TIMEOUT_S):
    """Set this rank up: device, CPU threads, default process group.

    Returns the torch.device this rank computes on (``cuda:LOCAL_RANK`` after
    ``torch.cuda.set_device``, or cpu).  Creates the default group when
    WORLD_SIZE > 1 and none exists yet (under Ray Train one already does; its
    size is checked against WORLD_SIZE).  Intra-op threads are set to
    ``threads_per_rank`` or ``cores // LOCAL_WORLD_SIZE`` so the ranks of one
    node do not oversubscribe its cores.
    """
    global _owns_group
    import torch
    import torch.distributed as dist


    env = DistEnv.from_environ(allow_single=True)
    dev = _resolve_device(device, env)
    torch.set_num_threads(threads_per_rank or max(1, usable_cores() // env.local_world_size))
    if env.world_size == 1:
        return dev
    if not dist.is_available():
        raise LaunchError("this torch build has no torch.distributed.", setting="WORLD_SIZE",
                          value=env.world_size, fix="install a torch build with distributed support.")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise LaunchError(f"an existing process group has rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, but the environment says {env.rank} of {env.world_size}.",
                              setting="WORLD_SIZE", value=env.world_size,
                              fix="let one launcher set the environment and create the group.")
        return dev
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend_for(dev)
    try:
        if is_loopback(env.master_addr):
            # Single node: keep gloo's pair sockets and NCCL's bootstrap on the
            # loopback interface too (the user's own setting wins).
            if "lo" in {name for _, name in socket.if_nameindex()}:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
                os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            store = _loopback_store(env, timeout)
            dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
    except LaunchError:
        raise
    except (RuntimeError, ValueError) as exc:  # DistNetworkError/DistStoreError derive from RuntimeError
        raise LaunchError(f"could not create the {backend} process group: {exc}",
                          setting="MASTER_ADDR:MASTER_PORT", value=f"{env.master_addr}:{env.master_port}",
                          fix="check that every rank can reach rank 0 at that address and that the port is "
                              "free (--master-port 0 picks one).", rank=env.rank) from exc
    _owns_group = True
    # Tear the group down before interpreter exit: a gloo/NCCL group still alive
    # while Python finalises can abort the process ("terminate called without an
    # active exception", exit 134) after a perfectly good run.
    atexit.register(shutdown_distributed)
    return dev


def shutdown_distributed() -> None:
    """Destroy the default group if :func:`init_distributed` created it."""
    global _owns_group
    if not _owns_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False
