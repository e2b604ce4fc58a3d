"""Run a function on N CPU ranks (gloo, spawned processes) and collect rank 0's result."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out_path)
    except Exception:
        with open(f"{out_path}.err{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """fn(*args) on ``world`` ranks; returns rank 0's return value."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True,
                               start_method="spawn")
        except Exception as exc:
            errs = [open(os.path.join(d, n)).read() for n in sorted(os.listdir(d)) if ".err" in n]
            raise AssertionError("rank failed:\n" + "\n".join(errs)) from exc
        return torch.load(out, weights_only=False)
