"""Ray launcher: the embedded default backend (one Ray Train worker per rank).

``launch_ray`` starts a private, local Ray instance in this process, runs one
``ray.train.torch.TorchTrainer`` worker per rank and shuts Ray down again.  Each
worker sees the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, NODE_RANK) and then either calls a
Python function given by import path (``tierlift train``) or runs a command as a
subprocess (``tierlift launch --backend ray -- CMD``).

Network exposure (Ray 2.60, measured): by default gcs_server, raylet and the
workers listen on every interface.  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
set before Ray is imported and inherited by every Ray process, makes Ray use
127.0.0.1 as the node address and all its listeners bind there.  The one
listener Ray does not control is torch's rendezvous store, which binds "::"
under ``env://``; the process group is therefore created by
``tierlift.parallel.env.init_distributed`` (through ``_TierliftTorchBackend``, a
Ray Train backend hook), which binds the store to the loopback MASTER_ADDR.
Token authentication (on by default in 2.60) stays on, with a fresh token per
run passed in the environment instead of one written to ``~/.ray``.

Ray is imported only inside ``launch_ray``: tierlift and the local launcher
work on machines without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

from tierlift.errors import LaunchError, TierliftError
from tierlift.launch.local import RankLog, pump_lines, rank_env
from tierlift.launch.ports import check_port_free, resolve_master_port
from tierlift.launch.ray_fate import JOB_ENV, Reaper, exit_with_driver
from tierlift.parallel.env import DEFAULT_TIMEOUT_S, DistEnv, init_distributed, usable_cores

__all__ = ["launch_ray", "CommandFailed"]

_FIX_RAY = "pip install 'tierlift[ray]', or use --backend local."

# Set before Ray is imported: Ray reads most of these at import time and its
# daemons (gcs_server, raylet, workers) inherit the driver's environment.
_FORCED_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # all listeners on 127.0.0.1
_DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no prompt, no phone-home
    "RAY_DEDUP_LOGS": "0",  # every rank's lines, as they come
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one local node: nothing to preempt
    "RAY_TRAIN_METRICS_ENABLED": "0",  # no metrics exporter without a dashboard
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # keep worker stdout plain (the patch printed lines twice)
    "RAY_process_group_cleanup_enabled": "1",  # a killed worker takes its subprocesses with it
}


class CommandFailed(LaunchError):
    """A rank's command exited non-zero under ``launch_ray``; keeps its exit code."""

    def __init__(self, message: str, *, returncode: int = 1, **kw: Any) -> None:
        self.returncode = returncode
        super().__init__(message, **kw)


@contextlib.contextmanager
def _ray_environ(local: bool) -> Iterator[None]:
    """Set the driver environment Ray must see, and restore it afterwards."""
    saved = dict(os.environ)
    if local:
        os.environ.update(_FORCED_ENV)
        if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not (
                "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ):
            # Explicit mode silences Ray's "token auth enabled" warning; the token
            # lives only in this process tree's environment.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _quiet_ray_logs() -> None:
    """worker_process_setup_hook, run in every Ray worker process: silence a Ray
    Train helper that, without the dashboard's state API, warns once a second
    that it cannot query it."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _import_ray():
    try:
        import ray
        import ray.train
        import ray.train.torch  # noqa: F401  (TorchTrainer, TorchConfig)
    except ImportError as exc:
        raise LaunchError(f"Ray is not installed ({exc.name or exc}).", setting="--backend", value="ray",
                          fix=_FIX_RAY) from None
    return ray


def _resolve_target(path: str):
    import importlib

    module, _, name = path.partition(":")
    if not module or not name:
        raise LaunchError("must look like 'package.module:function'.", setting="target", value=path,
                          fix="give the import path of the function each rank runs.")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn


# -- inside the Ray workers -------------------------------------------------------

def _apply_rank_env(addr: str, port: int) -> None:
    """Set the torchrun variables from the Ray Train context of this worker."""
    import ray.train

    ctx = ray.train.get_context()
    DistEnv(rank=ctx.get_world_rank(), local_rank=ctx.get_local_rank(), world_size=ctx.get_world_size(),
            local_world_size=ctx.get_local_world_size(), master_addr=addr, master_port=port,
            node_rank=ctx.get_node_rank()).apply()


def _node_address_and_port(port: int, setting: str) -> tuple[str, int]:
    import ray.util

    addr = ray.util.get_node_ip_address()  # 127.0.0.1 for the private local instance
    return addr, resolve_master_port(port, addr, setting=setting)


def _make_backend_config(device: str, threads_per_rank: int, timeout_s: float, port: int, port_setting: str):
    """A TorchConfig whose backend creates the group through init_distributed.

    Ray's own ``_TorchBackend.on_start`` uses ``env://``, whose TCPStore listens
    on all interfaces; everything else (CUDA_VISIBLE_DEVICES sharing, group
    teardown on shutdown) is inherited from it.
    """
    import ray
    from dataclasses import dataclass
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _TierliftTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            addr, port = worker_group.execute_single(0, _node_address_and_port, backend_config.port,
                                                     backend_config.port_setting)
            worker_group.execute(_apply_rank_env, addr=addr, port=port)
            # Sync point: every rank enters init_distributed at once (rank 0 binds the store).
            ray.get([worker_group.execute_single_async(i, init_distributed, backend_config.device,
                                                       threads_per_rank=backend_config.threads_per_rank,
                                                       timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])

    @dataclass
    class _TierliftTorchConfig(TorchConfig):
        device: str = "cpu"
        threads_per_rank: int = 0
        port: int = 0  # the group's MASTER_PORT; 0 = a free one
        port_setting: str = "run.master_port"

        @property
        def backend_cls(self):
            return _TierliftTorchBackend

    return _TierliftTorchConfig(timeout_s=int(timeout_s), device=device, threads_per_rank=threads_per_rank,
                                port=port, port_setting=port_setting)


def _agree_on_port(env: DistEnv, wanted: int, setting: str) -> int:
    """Rank 0 picks (or checks) the command's MASTER_PORT; every rank gets it.

    Sync point: a broadcast over the group Ray Train set up; a CPU tensor so it
    goes through gloo even when the default group is "cuda:nccl,cpu:gloo".
    """
    import torch
    import torch.distributed as dist

    error = None
    port = 0
    if env.rank == 0:
        try:
            port = resolve_master_port(wanted, env.master_addr, setting=setting)
        except LaunchError as exc:
            error = exc  # still broadcast, so the other ranks do not hang
    box = torch.tensor([port], dtype=torch.int64)
    dist.broadcast(box, src=0)
    if error is not None:
        raise error
    if int(box.item()) == 0:
        raise LaunchError("rank 0 could not choose a port for the command.", setting=setting,
                          value=wanted, fix="see rank 0's error; choose another port or 0.")
    return int(box.item())


def _run_command(spec: Mapping[str, Any], env: DistEnv) -> None:
    if env.world_size > 1:
        port = _agree_on_port(env, spec["master_port"], spec["port_setting"])
    else:
        port = resolve_master_port(spec["master_port"], env.master_addr, setting=spec["port_setting"])
    sub = DistEnv(rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
                  local_world_size=env.local_world_size, master_addr=env.master_addr, master_port=port,
                  node_rank=env.node_rank)
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # Ray's 1-CPU default
    child_env = rank_env(sub, nproc=env.world_size, base=base, env_extra=spec["env"], run_dir=spec["run_dir"])
    log = None
    if spec["run_dir"]:
        os.makedirs(os.path.join(spec["run_dir"], "logs"), exist_ok=True)
        log = RankLog(os.path.join(spec["run_dir"], "logs", f"rank-{env.rank}.log"), sys.stderr)
    try:
        p = subprocess.Popen(spec["cmd"], env=child_env, cwd=spec["cwd"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise LaunchError(f"cannot start the command: {exc.strerror}.", setting="command", value=spec["cmd"][0],
                          fix="check the program name and that it is executable.", rank=env.rank) from None
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    lock = threading.Lock()
    pumps = [threading.Thread(target=pump_lines, args=(s, c, prefix, log, lock), daemon=True)
             for s, c in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    for t in pumps:
        t.start()
    try:
        rc = p.wait()
    finally:
        if p.poll() is None:  # the worker is being torn down (another rank failed)
            p.kill()
            p.wait()
        for t in pumps:
            t.join(5.0)
        if log is not None:
            log.close()
    if rc != 0:
        rc = 128 - rc if rc < 0 else rc
        raise CommandFailed(f"command exited with code {rc}.", returncode=rc, setting="command",
                            value=" ".join(spec["cmd"]), fix="see this rank's output above.", rank=env.rank)


def _train_loop(spec: dict) -> None:
    """train_loop_per_worker: runs on every rank inside a Ray Train worker."""
    env = DistEnv.from_environ()  # set by _TierliftTorchBackend.on_start
    if spec["driver_pid"]:
        exit_with_driver(spec["driver_pid"])  # a rank never trains on after its driver died
    if not spec["debug"]:
        # Ray Train logs every rank's exception with its traceback ("Error in
        # training function"); the driver already prints a TierliftError as one
        # line and any other error with that traceback once.  Set here, after
        # Ray configured the worker's logging.
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    os.environ.update(spec["env"])
    if spec["run_dir"]:
        os.environ["TIERLIFT_RUN_DIR"] = spec["run_dir"]
    os.chdir(spec["cwd"])  # as under torchrun: relative paths mean the launch directory
    try:
        if spec["cmd"]:
            _run_command(spec, env)
        else:
            _resolve_target(spec["target"])(**spec["kwargs"])
    except TierliftError as exc:
        if exc.rank is None:
            exc.rank = env.rank
            exc.args = (exc.render(),)
        raise


# -- on the driver ----------------------------------------------------------------

def _unwrap(exc: BaseException) -> tuple[BaseException, str]:
    """(the exception raised in user code, its traceback text) from Ray's wrapper."""
    base = getattr(exc, "_base_exc", exc)
    return base, str(exc) if base is not exc else ""


def _root_cause(exc: BaseException) -> BaseException:
    """The first TierliftError along Ray's wrappers (RayTaskError.cause,
    UserExceptionWithTraceback, __cause__), else the innermost exception."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TierliftError):
            return exc
        nxt = getattr(exc, "cause", None) or getattr(exc, "_base_exc", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            return exc
        exc = nxt
    return exc


def _surface(exc: BaseException) -> int:
    """Turn a failed fit() into an exit code (a command's) or a TierliftError."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError):
        failures = sorted(((r, *_unwrap(e)) for r, e in exc.worker_failures.items()), key=lambda x: x[0])
        for rank, base, _ in failures:
            if isinstance(base, CommandFailed):
                print(f"tierlift: error: {base}", file=sys.stderr)
                return base.returncode
        for rank, base, _ in failures:
            if isinstance(base, TierliftError):
                raise base
        if failures:
            rank, base, tb = failures[0]
            if tb:
                sys.stderr.write(tb if tb.endswith("\n") else tb + "\n")
            raise LaunchError(f"failed with {type(base).__name__}: {base}", setting="rank", value=rank,
                              fix="see the traceback above.") from None
    if isinstance(exc, ControllerError):
        # Failures while starting the ranks (process group, device) land here.
        root = _root_cause(exc.controller_failure)
        if isinstance(root, TierliftError):
            raise root
        raise LaunchError(f"starting the ranks failed: {type(root).__name__}: {root}", setting="--backend",
                          value="ray", fix="rerun with --debug, or use --backend local.") from None
    raise LaunchError(f"Ray Train failed: {exc}", setting="--backend", value="ray",
                      fix="rerun with --debug, or use --backend local.") from None


def launch_ray(*, nproc: int, run_dir: str | None = None, target: str | None = None,
               kwargs: Mapping[str, Any] | None = None, cmd: Sequence[str] | None = None,
               device: str = "auto", name: str | None = None, env_extra: Mapping[str, str] | None = None,
               master_port: int = 0, port_setting: str = "--master-port", threads_per_rank: int = 0,
               timeout_s: float = DEFAULT_TIMEOUT_S, address: str | None = None, debug: bool = False) -> int:
    """Run ``nproc`` ranks under Ray Train; return the exit code.

    Exactly one of ``target`` ("pkg.module:function", called with ``kwargs`` on
    every rank) or ``cmd`` (run as a subprocess on every rank) is given.
    ``master_port`` (0 = a free one) is the MASTER_PORT of the ranks' process
    group for a target, and of the command's own group for a command (Ray's
    group then takes a free port).
    Returns 0 on success and a failing command's exit code; a TierliftError
    raised on a rank is re-raised here (with its rank); other failures become a
    LaunchError.  ``run_dir`` holds Ray's storage (``run_dir/ray``) and, for
    commands, ``logs/rank-N.log``.  ``address=None`` starts a private local Ray
    and shuts it down at the end; an address (the multi-node seam) connects to
    an existing cluster and leaves it running.  ``debug`` keeps Ray Train's
    per-rank tracebacks.
    """
    if (target is None) == (not cmd):
        raise LaunchError("give exactly one of a target function or a command.", setting="command", value=cmd,
                          fix="tierlift train uses the training entry; tierlift launch needs `-- CMD`.")
    if nproc < 1:
        raise LaunchError("must be >= 1.", setting="--nproc", value=nproc, fix="give the number of ranks.")
    run_dir = os.path.abspath(run_dir) if run_dir else None
    local = address is None
    if master_port and local:
        check_port_free(master_port, "127.0.0.1", setting=port_setting)  # fail before Ray's ~10 s start-up
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local and torch.cuda.device_count() < nproc:
        # Ray would wait for GPUs that never come; say so now.
        raise LaunchError(f"{nproc} rank(s) need one GPU each; this machine has {torch.cuda.device_count()}.",
                          setting="run.device", value=device, fix="lower --nproc, or use --device cpu.")
    extra = dict(env_extra or {})
    if "OMP_NUM_THREADS" in os.environ:  # the user's choice beats Ray's 1-thread default in workers
        extra.setdefault("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    spec = {"target": target, "kwargs": dict(kwargs or {}), "cmd": list(cmd or []), "cwd": os.getcwd(),
            "run_dir": run_dir, "env": extra, "master_port": int(master_port), "port_setting": port_setting,
            "debug": debug, "driver_pid": os.getpid() if local else None}
    # Workers run the driver's interpreter (same venv); the checkout goes on
    # PYTHONPATH so tierlift imports there even when it is not installed.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)},
                   "worker_process_setup_hook": f"{__name__}._quiet_ray_logs"}
    preimported = "ray" in sys.modules
    with _ray_environ(local):
        ray = _import_ray()
        from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchTrainer

        if local and preimported:
            # Ray was imported before the environment above was set: refresh the
            # copies it took at import (the node-address flag, the auth mode and
            # token cache), as Ray's own token set-up does; otherwise the driver
            # talks to its GCS without the token the GCS expects.
            from ray._private import ray_constants
            from ray._raylet import AuthenticationTokenLoader, Config

            ray_constants.ENABLE_RAY_CLUSTER = False
            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        storage = os.path.join(run_dir, "ray") if run_dir else tempfile.mkdtemp(prefix="tierlift-ray-")
        owns_ray = not ray.is_initialized()
        reaper = Reaper() if owns_ray and local else None  # Ray's processes die with this one
        if reaper is not None:
            os.environ[JOB_ENV] = reaper.token  # inherited by every Ray process; restored by _ray_environ
        try:
            if owns_ray:
                init_kw: dict[str, Any] = dict(address=address or "local", include_dashboard=False,
                                               log_to_driver=True, logging_level=logging.WARNING,
                                               runtime_env=runtime_env)
                if local:
                    # Logical CPUs: one per worker is Ray's scheduling token, not
                    # a real limit (init_distributed sets each rank's threads).
                    init_kw.update(num_cpus=max(nproc, usable_cores()), object_store_memory=256 << 20)
                ray.init(**init_kw)
            trainer = TorchTrainer(
                _train_loop, train_loop_config=spec,
                torch_config=_make_backend_config(device, threads_per_rank, timeout_s,
                                                  port=0 if cmd else int(master_port), port_setting=port_setting),
                scaling_config=ScalingConfig(num_workers=nproc, use_gpu=device == "cuda"),
                run_config=RunConfig(name=name or f"tierlift-{time.strftime('%Y%m%d-%H%M%S')}",
                                     storage_path=storage, failure_config=FailureConfig(max_failures=0),
                                     logging_config=LoggingConfig(log_level="WARNING"),
                                     worker_runtime_env=runtime_env))
            try:
                trainer.fit()
            except TrainingFailedError as exc:
                return _surface(exc)
            return 0
        finally:
            if owns_ray:
                ray.shutdown()  # stops gcs_server, raylet and every worker it started
            if reaper is not None:
                reaper.close()  # and whatever Ray left running (its agents linger for a minute)
            if run_dir is None:
                shutil.rmtree(storage, ignore_errors=True)
