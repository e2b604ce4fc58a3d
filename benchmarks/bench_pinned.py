"""Pinned host memory: how fast each method pins, what it really pins, and DMA speed from slabs.

    python benchmarks/bench_pinned.py --out benchmarks/results/pinned_h100.json \
        [--sizes-mib 64,128,256,512,1024,1126,2048] [--copy-mib 4,16,64,256] \
        [--repeats 3] [--iters 20]

Needs a CUDA GPU; exits with status 2 and a message otherwise.  Three parts, one JSON:

* ``pinning``: :func:`tierlift.offload.pinned.benchmark_pinning` per size -- "register"
  (mmap + touch + cudaHostRegister, the pool's default; phases timed apart) against
  "hostalloc" (torch's pinned allocator, cudaHostAlloc, on a cold cache), each with
  GiB/s = requested bytes / seconds and ``overhead_ratio`` = pinned / requested (the
  1126 MiB size shows torch's power-of-two rounding: 2 GiB pinned).
* ``pool``: a PinnedPool holding the copy slabs -- requested vs pinned bytes, and torch's
  host-cache counters, which must not move (the pool bypasses that cache).
* ``copies``: H2D and D2H GB/s (1e9 B/s, as design.md section 4) for each copy size, from and
  to pool slabs, timed with CUDA events on a side stream over ``--iters`` back-to-back
  copies after two warm-up copies; a pageable-memory H2D/D2H baseline next to it.

Reference numbers (H100 machine, gpu-machine.md): cudaHostAlloc ~2.4 GiB/s, malloc + touch +
cudaHostRegister ~9 GiB/s; pinned H2D 55 GB/s at >= 4 MiB per copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MiB = 1 << 20


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _copy_gbps(torch, dst, src, nbytes: int, iters: int, stream) -> float:
    """GB/s of ``iters`` back-to-back ``dst[:n].copy_(src[:n], non_blocking=True)`` on ``stream``."""
    d, s = dst[:nbytes], src[:nbytes]
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: first-touch of the IOMMU/TLB path, lazy context setup
            d.copy_(s, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            d.copy_(s, non_blocking=True)
        end.record(stream)
    end.synchronize()  # sync point: the only one per measurement
    return nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--sizes-mib", default="64,128,256,512,1024,1126,2048", help="pinning sizes, MiB")
    ap.add_argument("--copy-mib", default="4,16,64,256", help="H2D/D2H copy sizes, MiB")
    ap.add_argument("--repeats", type=int, default=3, help="pinning repeats per size and method (median)")
    ap.add_argument("--iters", type=int, default=20, help="copies per timed H2D/D2H measurement")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_pinned: needs a CUDA GPU (torch.cuda.is_available() is False); run it on the device "
              "machine. Nothing was measured.", file=sys.stderr)
        return 2

    from _bench_common import env_facts, gpu_facts, now_iso, pinned_host_stats, write_json

    from tierlift.offload.pinned import PinnedPool
    from tierlift.offload.pinned_bench import benchmark_pinning

    sizes = [m * MiB for m in _ints(args.sizes_mib)]
    copies = [m * MiB for m in _ints(args.copy_mib)]
    result: dict = dict(bench="pinned", started=now_iso(), argv=sys.argv, **env_facts(), **gpu_facts())
    torch.cuda.init()

    t0 = time.perf_counter()
    result["pinning"] = benchmark_pinning(sizes, repeats=args.repeats)
    result["pinning_wall_s"] = time.perf_counter() - t0
    write_json(args.out, result)  # keep the first part even if the copies fail

    biggest = max(copies)
    host_cache_before = pinned_host_stats()
    with PinnedPool(4 * biggest + 64 * MiB, method="register") as pool:
        h2d_src, d2h_dst = pool.slab(biggest, name="h2d_src"), pool.slab(biggest, name="d2h_dst")
        st = pool.stats()
        result["pool"] = dict(method=st.method, pinned=st.pinned, requested_bytes=st.requested_bytes,
                              reserved_bytes=st.reserved_bytes, pinned_bytes=st.pinned_bytes,
                              overhead_ratio=st.overhead_ratio, memlock=pool.memlock.describe(),
                              slab_is_pinned=h2d_src.tensor.is_pinned(),
                              host_cache_before=host_cache_before, host_cache_after=pinned_host_stats())
        src, dst = h2d_src.tensor, d2h_dst.tensor
        src.fill_(1)
        gpu = torch.empty(biggest, dtype=torch.uint8, device="cuda")
        pageable = torch.empty(biggest, dtype=torch.uint8).fill_(1)
        stream = torch.cuda.Stream()
        rows = []
        for n in copies:
            rows.append(dict(bytes=n, iters=args.iters,
                             h2d_gbps=_copy_gbps(torch, gpu, src, n, args.iters, stream),
                             d2h_gbps=_copy_gbps(torch, dst, gpu, n, args.iters, stream),
                             pageable_h2d_gbps=_copy_gbps(torch, gpu, pageable, n, args.iters, stream),
                             pageable_d2h_gbps=_copy_gbps(torch, pageable, gpu, n, args.iters, stream)))
            print(f"copy {n // MiB:5d} MiB: H2D {rows[-1]['h2d_gbps']:6.1f} GB/s  D2H {rows[-1]['d2h_gbps']:6.1f} "
                  f"GB/s  (pageable {rows[-1]['pageable_h2d_gbps']:.1f} / {rows[-1]['pageable_d2h_gbps']:.1f})")
        result["copies"] = rows
    result["finished"] = now_iso()
    write_json(args.out, result)
    for r in result["pinning"]["results"]:
        print(f"pin {r['method']:9s} {r['bytes'] // MiB:5d} MiB: {r['gib_per_s']:6.2f} GiB/s, "
              f"pinned/requested {r['overhead_ratio']:.3f}{'' if r['pool_accepts'] else ' (pool refuses)'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
