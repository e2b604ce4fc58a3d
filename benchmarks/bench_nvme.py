"""NVMe engine throughput: tierlift's NVMeFile (threads backend) vs DeepSpeed's aio handle.

    source benchmarks/setup_device.sh      # GPU machine, with .whl carried (deepspeed wheel + libaio debs)
    python3 benchmarks/bench_nvme.py --dir /tmp/tierlift-nvme-bench --size-gib 4 \
        --block-sizes 1,8,16 --threads 1,4,8,16 --queue-depth 8 --repeats 2 \
        --out benchmarks/results/nvme_h100.json

Both systems move the same bytes between the same host buffer (4 KiB-aligned,
page-locked when CUDA is there, so DeepSpeed does not bounce through its own
pinned copy) and the same preallocated file, extent by
extent (``--item-mib`` each, like chunk shards), at the same file offsets:
tierlift through ``NVMeFile.write/read`` + ``wait``; DeepSpeed through
``aio_handle(block_size, queue_depth, single_submit, overlap_events,
intra_op_parallelism=threads).async_pwrite/async_pread`` of every extent, then
one ``wait()`` -- the way its swapper uses it.  Per (block size, threads) config
and repeat the systems alternate (odd repeats DeepSpeed first), writes then reads;
the host buffer is zeroed before each read pass (outside the timing) and sampled
extents are checked against their crc32 afterwards, so a fast wrong read cannot
pass.  Each config starts with one untimed write pass: the first write into a
freshly preallocated file also converts its unwritten extents, and whoever went
first would pay for it.  Both have threads x queue_depth requests in flight (tierlift: that many
blocking workers; DeepSpeed: threads each with queue_depth iocbs).  tierlift
writes compute crc32 checksums unless ``--no-checksum``.

If DeepSpeed's async_io op cannot be built or loaded, the reason is printed and
recorded, tierlift's numbers are still measured and written, and the exit status is 3.
The JSON (rewritten after every config) goes to --out, a markdown table beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _bench_common as bc  # noqa: E402

MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/tierlift-nvme-bench", help="directory on the disk under test")
    p.add_argument("--size-gib", type=float, default=4.0, help="bytes moved per pass (GiB)")
    p.add_argument("--item-mib", type=int, default=256, help="extent size (MiB): one chunk shard's state")
    p.add_argument("--block-sizes", default="1,8,16", help="request sizes in MiB, comma-separated")
    p.add_argument("--threads", default="1,4,8,16", help="tierlift I/O threads = DeepSpeed intra_op_parallelism")
    p.add_argument("--queue-depth", type=int, default=8)
    p.add_argument("--single-submit", action="store_true")
    p.add_argument("--no-overlap-events", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-checksum", action="store_true", help="tierlift writes without crc32")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the sweep; later configs are skipped")
    p.add_argument("--out", required=True, help="result JSON; the markdown goes next to it as .md")
    a = p.parse_args(argv)
    a.block_sizes = [int(float(x) * MiB) for x in a.block_sizes.split(",")]
    a.threads = [int(x) for x in a.threads.split(",")]
    a.md_path = os.path.splitext(a.out)[0] + ".md"
    return a


def load_deepspeed_aio():
    """(op module, None) or (None, reason)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        b = AsyncIOBuilder()
        if not b.is_compatible(verbose=True):
            return None, "AsyncIOBuilder().is_compatible() is False (libaio headers/library not found)"
        t = time.perf_counter()
        op = b.load(verbose=False)
        print(f"[bench_nvme] DeepSpeed async_io op loaded in {time.perf_counter() - t:.1f} s", flush=True)
        return op, None
    except Exception as exc:  # ImportError, compile errors
        return None, f"{type(exc).__name__}: {exc}"


def make_buffer(nbytes: int):
    """Aligned host buffer (page-locked when CUDA is there: DeepSpeed bounces through its
    own pinned copy otherwise) filled with a 64 MiB random pattern, tiles stamped with their index."""
    import torch
    from tierlift.offload.nvme import aligned_empty

    buf, pinned = None, "no (no CUDA)"
    if torch.cuda.is_available():
        try:  # cudaHostAlloc memory is page-aligned; PyTorch's host cache rounds up, fine for one buffer
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            pinned = "yes (pin_memory=True)" if buf.data_ptr() % 4096 == 0 else None
        except RuntimeError as exc:
            pinned = f"no (pin_memory failed: {exc})"
        if pinned is None:
            buf, pinned = None, "no (pinned buffer not 4 KiB-aligned)"
    if buf is None:
        buf = aligned_empty(nbytes)
    tile = min(64 * MiB, nbytes)
    pattern = torch.randint(0, 256, (tile,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for i, lo in enumerate(range(0, nbytes, tile)):
        n = min(tile, nbytes - lo)
        buf[lo:lo + n].copy_(pattern[:n])
        buf[lo:lo + min(8, n)].copy_(torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)[:min(8, n)])
    return buf, pinned


def disk_facts(path: str) -> dict:
    st = os.statvfs(path)
    best, fstype, dev = "", None, None
    with open("/proc/mounts") as f:  # the longest mount point that contains path
        for line in f:
            d, mnt, typ = line.split()[:3]
            if (path + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, fstype, dev = mnt, typ, d
    return {"dir": path, "mount": best, "fstype": fstype, "device": dev,
            "free_gib": st.f_bavail * st.f_frsize / bc.GiB}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from tierlift.offload.extents import plan_extents
    from tierlift.offload.nvme import NVMeFile
    from tierlift.offload.policy import AioConfig

    t_start = time.perf_counter()
    item = a.item_mib * MiB
    n_items = max(1, int(a.size_gib * bc.GiB) // item)
    unit = 4096 * max(a.threads)
    if item % unit:
        raise SystemExit(f"--item-mib {a.item_mib}: must be a multiple of 4096 x max threads bytes "
                         "(DeepSpeed splits each call evenly over its threads)")
    total = n_items * item
    plan = plan_extents([(("item", i), item) for i in range(n_items)])
    os.makedirs(a.dir, exist_ok=True)

    ds_op, ds_error = (None, "skipped (--skip-deepspeed)") if a.skip_deepspeed else load_deepspeed_aio()
    if ds_op is None:
        print(f"[bench_nvme] DEEPSPEED AIO UNAVAILABLE: {ds_error}\n"
              "[bench_nvme]   fix: install libaio (apt-get install libaio-dev, or source benchmarks/setup_device.sh "
              "with .whl carried) and deepspeed; measuring tierlift only.", flush=True)
    buf, pinned = make_buffer(total)
    views = {e.key: buf[e.offset:e.offset + e.nbytes] for e in plan}
    if pinned.startswith("yes") and not buf[:1].is_pinned():
        pinned = "no (torch reports the buffer as not pinned)"
    sample = [plan.extents[0].key, plan.extents[-1].key, plan.extents[len(plan) // 2].key]
    want_crc = {k: zlib.crc32(memoryview(views[k].numpy())) for k in sample}
    result = {"bench": "nvme", "started": bc.now_iso(), "args": {k: v for k, v in vars(a).items()},
              "env": bc.env_facts(), "gpu": bc.gpu_facts(), "disk": disk_facts(os.path.abspath(a.dir)),
              "bytes_per_pass": total, "items": n_items, "item_bytes": item, "buffer_pinned": pinned,
              "deepspeed_aio": {"available": ds_op is not None, "error": ds_error}, "configs": []}
    print(f"[bench_nvme] {total / bc.GiB:.2f} GiB per pass in {n_items} extents of {a.item_mib} MiB; "
          f"buffer pinned: {pinned}; disk: {result['disk']}", flush=True)

    def check(system: str) -> None:
        for k in sample:
            if zlib.crc32(memoryview(views[k].numpy())) != want_crc[k]:
                raise SystemExit(f"[bench_nvme] {system} read back wrong data in extent {k}")

    rc = 0
    for bs in a.block_sizes:
        for threads in a.threads:
            left = a.budget - (time.perf_counter() - t_start)
            cfg = {"block_size": bs, "threads": threads, "queue_depth": a.queue_depth, "runs": [],
                   "in_flight": {"tierlift": threads * a.queue_depth, "deepspeed": threads * a.queue_depth}}
            if left < 30:
                cfg["skipped"] = f"budget: {left:.0f} s left"
                result["configs"].append(cfg)
                continue
            aio = AioConfig(block_size=bs, queue_depth=a.queue_depth, threads=threads,
                            single_submit=a.single_submit, overlap_events=not a.no_overlap_events)
            f = NVMeFile(a.dir, 0, plan, aio, checksum=not a.no_checksum, setting="--dir")
            cfg["direct"] = f.direct
            if not f.direct:
                print("[bench_nvme] WARNING: no O_DIRECT on this filesystem; numbers include the page cache")
            ds = (ds_op.aio_handle(bs, a.queue_depth, a.single_submit, not a.no_overlap_events, threads)
                  if ds_op is not None else None)

            def tl_write():
                for h in [f.write(k, v) for k, v in views.items()]:
                    h.wait()

            def tl_read():
                for h in [f.read(k, v) for k, v in views.items()]:
                    h.wait()

            def ds_io(write: bool):
                call = ds.async_pwrite if write else ds.async_pread
                for e in plan:
                    if call(views[e.key], f.path, e.offset) != 0:
                        raise RuntimeError(f"deepspeed async_{'pwrite' if write else 'pread'} refused {e.key}")
                if ds.wait() != len(plan):
                    raise RuntimeError("deepspeed wait() completed fewer ops than submitted")

            systems = {"tierlift": (tl_write, tl_read)}
            if ds is not None:
                systems["deepspeed"] = (lambda: ds_io(True), lambda: ds_io(False))
            try:
                # The first write into freshly preallocated (unwritten) extents also converts
                # their metadata; do it once, untimed, so neither system pays it in the sweep.
                cfg["first_write_gbps"] = total / timed(tl_write) / 1e9
                for rep in range(a.repeats):
                    order = list(systems) if rep % 2 == 0 else list(reversed(systems))
                    for direction in ("write", "read"):
                        for name in order:
                            if direction == "read":
                                buf.zero_()
                            s = timed(systems[name][0 if direction == "write" else 1])
                            if direction == "read":
                                check(name)  # a correct read also restores the pattern for the next write
                            cfg["runs"].append({"repeat": rep, "system": name, "direction": direction,
                                                "seconds": s, "gbps": total / s / 1e9})
                            print(f"[bench_nvme] bs {bs // MiB} MiB threads {threads} rep {rep} {name:9s} "
                                  f"{direction:5s} {total / s / 1e9:6.2f} GB/s", flush=True)
                cfg["tierlift_stats"] = f.stats().as_dict()
            except Exception as exc:  # record and go on with the next config
                cfg["error"] = f"{type(exc).__name__}: {exc}"
                print(f"[bench_nvme] config failed: {cfg['error']}", flush=True)
                rc = 1
            finally:
                f.close()
            summarize(cfg)
            result["configs"].append(cfg)
            result["seconds"] = time.perf_counter() - t_start
            bc.write_json(a.out, result)
            write_md(a.md_path, result)
    bc.write_json(a.out, result)
    write_md(a.md_path, result)
    print(f"[bench_nvme] wrote {a.out} and {a.md_path}")
    if ds_op is None and not a.skip_deepspeed:
        print(f"[bench_nvme] FAILED to measure DeepSpeed: {ds_error}", flush=True)
        return 3
    return rc


def summarize(cfg: dict) -> None:
    med = {}
    for sysname in ("tierlift", "deepspeed"):
        for d in ("write", "read"):
            xs = [r["gbps"] for r in cfg["runs"] if r["system"] == sysname and r["direction"] == d]
            if xs:
                med[f"{sysname}_{d}_gbps"] = statistics.median(xs)
    for d in ("write", "read"):
        t, s = med.get(f"tierlift_{d}_gbps"), med.get(f"deepspeed_{d}_gbps")
        if t and s:
            med[f"ratio_{d}"] = t / s  # tierlift / DeepSpeed
    cfg["median"] = med


def write_md(path: str, r: dict) -> None:
    lines = [f"# NVMe engine: tierlift vs DeepSpeed aio ({r['started']})", "",
             f"{r['bytes_per_pass'] / bc.GiB:.2f} GiB per pass, {r['items']} extents of "
             f"{r['item_bytes'] >> 20} MiB; disk {r['disk']}; host buffer pinned: {r['buffer_pinned']}; "
             f"DeepSpeed aio: {'yes' if r['deepspeed_aio']['available'] else r['deepspeed_aio']['error']}", "",
             "| block MiB | threads | qd | write TL GB/s | write DS GB/s | TL/DS "
             "| read TL GB/s | read DS GB/s | TL/DS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r["configs"]:
        m = c.get("median", {})
        note = c.get("skipped") or c.get("error")
        cells = [bc.fmt(m.get(k), 2) for k in ("tierlift_write_gbps", "deepspeed_write_gbps", "ratio_write",
                                                "tierlift_read_gbps", "deepspeed_read_gbps", "ratio_read")]
        lines.append(f"| {c['block_size'] >> 20} | {c['threads']} | {c['queue_depth']} | " + " | ".join(cells)
                     + (f" | {note}" if note else "") + " |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
