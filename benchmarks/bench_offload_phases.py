"""What each phase of a CPU-offloaded step costs on this machine, in one run.

    python benchmarks/bench_offload_phases.py --out $OUT/offload_phases.json [--elems-m 64]

Needs a CUDA GPU (exit 2 otherwise).  Parts, one JSON:

* ``cpu``: torch's fused CPU AdamW (the offloaded optimizer's kernel), the fp32 -> bf16
  cast and the fp32 norm, in elements/s and GB/s of memory traffic (AdamW moves 28 B per
  element: reads p, g, m, v, writes p, m, v), at 1, 4, 8 and all cores.
* ``pcie``: pinned H2D and D2H GB/s alone and both directions at once (256 MiB copies).
* ``gpu_streamed_step``: AdamW on the GPU over state that lives in pinned host memory:
  H2D master, m, v (12 B/elem), fused CUDA AdamW, D2H the three back, chunks pipelined
  over two streams -- the rate a GPU-stepped chunk costs the PCIe link.
* ``engine_stream``: parameters streamed host -> GPU by the ZeRO engine itself
  (stage 3, ``offload.param: cpu``, a forward of layers whose compute is negligible):
  the bytes that crossed the link per second (fp32 masters, cast on the GPU) as a
  ratio of the raw pinned H2D rate measured in the same run (issue 4's >= 0.9).

Every number is 1e9 B/s or elements/s from CUDA events or perf_counter over repeated
runs after a warm-up; the minimum time of ``--repeats`` is kept.
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


def _best(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def cpu_part(torch, n: int, repeats: int) -> list[dict]:
    p, g, m, v = (torch.randn(n) for _ in range(4))
    v.abs_()
    p16 = torch.empty(n, dtype=torch.bfloat16)
    step = torch.tensor(1.0)

    def adam():
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                            eps=1e-8, amsgrad=False, maximize=False)
    rows = []
    cores = os.cpu_count() or 1
    for t in sorted({1, 4, 8, torch.get_num_threads(), cores}):
        if t > cores:
            continue
        torch.set_num_threads(t)
        a = _best(adam, repeats)
        c = _best(lambda: p16.copy_(p), repeats)
        nn_ = _best(lambda: torch.linalg.vector_norm(g), repeats)
        rows.append(dict(threads=t, adamw_gelem_s=n / a / 1e9, adamw_gbps=28 * n / a / 1e9,
                         cast_gelem_s=n / c / 1e9, norm_gelem_s=n / nn_ / 1e9))
        print(f"cpu threads {t:3d}: adamw {rows[-1]['adamw_gelem_s']:.2f} Gelem/s ({rows[-1]['adamw_gbps']:.0f} GB/s)"
              f"  cast {rows[-1]['cast_gelem_s']:.2f}  norm {rows[-1]['norm_gelem_s']:.2f} Gelem/s", flush=True)
    torch.set_num_threads(cores)
    return rows


def _events(torch, stream, fn, iters: int) -> float:
    """Seconds per call of ``fn`` enqueued ``iters`` times on ``stream``."""
    with torch.cuda.stream(stream):
        fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(stream)
        for _ in range(iters):
            fn()
        e.record(stream)
    e.synchronize()
    return s.elapsed_time(e) / 1e3 / iters


def pcie_part(torch, iters: int) -> dict:
    n = 256 * MiB
    h_src = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    h_dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d_a = torch.empty(n, dtype=torch.uint8, device="cuda")
    d_b = torch.empty(n, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    h2d = n / _events(torch, s1, lambda: d_a.copy_(h_src, non_blocking=True), iters) / 1e9
    d2h = n / _events(torch, s1, lambda: h_dst.copy_(d_b, non_blocking=True), iters) / 1e9
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        with torch.cuda.stream(s1):
            d_a.copy_(h_src, non_blocking=True)
        with torch.cuda.stream(s2):
            h_dst.copy_(d_b, non_blocking=True)
    torch.cuda.synchronize()
    both = 2 * n * iters / (time.perf_counter() - t0) / 1e9
    out = dict(h2d_gbps=h2d, d2h_gbps=d2h, bidir_total_gbps=both)
    print(f"pcie: H2D {h2d:.1f} GB/s  D2H {d2h:.1f} GB/s  both at once {both:.1f} GB/s total", flush=True)
    return out


def gpu_streamed_step(torch, chunk: int, chunks: int, repeats: int) -> dict:
    """AdamW on the GPU of ``chunks`` chunks whose state is in pinned host memory."""
    host = [[torch.randn(chunk).pin_memory() for _ in range(3)] for _ in range(chunks)]
    for h in host:
        h[2].abs_()
    grads = [torch.randn(chunk, device="cuda") for _ in range(chunks)]
    stage = [[torch.empty(chunk, device="cuda") for _ in range(3)] for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    step = torch.tensor(1.0, device="cuda")

    def run():
        for i in range(chunks):
            st, buf = streams[i % 2], stage[i % 2]
            with torch.cuda.stream(st):
                for d, h in zip(buf, host[i]):
                    d.copy_(h, non_blocking=True)
                torch._fused_adamw_([buf[0]], [grads[i]], [buf[1]], [buf[2]], [], [step], lr=1e-4, beta1=0.9,
                                    beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
                for d, h in zip(buf, host[i]):
                    h.copy_(d, non_blocking=True)
        torch.cuda.synchronize()
    t = _best(run, repeats)
    n = chunk * chunks
    out = dict(chunk_elems=chunk, chunks=chunks, gelem_s=n / t / 1e9, pcie_gbps_each_way=12 * n / t / 1e9)
    print(f"gpu streamed step: {out['gelem_s']:.2f} Gelem/s ({out['pcie_gbps_each_way']:.1f} GB/s each way)", flush=True)
    return out


def engine_stream(torch, layers: int, width: int, repeats: int, raw_h2d_gbps: float) -> dict:
    import torch.nn as nn

    from tierlift.offload.policy import CPUOffload, OffloadConfig
    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(width, width, bias=False)

        def forward(self, x):
            return self.lin(x)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Stack()
    eng = ZeroEngine(model, ZeroConfig(stage=3, wrap=["Block"], prefetch_units=2), PrecisionConfig(compute="bf16"),
                     OptimizerConfig(grad_clip=0.0), torch.device("cuda"),
                     offload=OffloadConfig(optimizer=CPUOffload(), param=CPUOffload()))
    x = torch.randn(1, width, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            eng.forward_begin()
            model(x)
            eng.forward_end_eval()
        torch.cuda.synchronize()
    t = _best(fwd, repeats)
    elems = layers * width * width
    # Host-tier chunks cross PCIe as their fp32 masters (4 B/elem) and are cast on the
    # GPU; the link rate counts the bytes that crossed, the parameter rate bf16 bytes.
    link_gbps, param_gbps = 4 * elems / t / 1e9, 2 * elems / t / 1e9
    eng.close()
    out = dict(layers=layers, chunk_elems=width * width, seconds=t, link_gbps=link_gbps, param_gbps=param_gbps,
               raw_h2d_gbps=raw_h2d_gbps, ratio=link_gbps / raw_h2d_gbps)
    print(f"engine stream: {link_gbps:.1f} GB/s over the link = {out['ratio']:.2f}x raw pinned H2D "
          f"({param_gbps:.1f} GB/s of bf16 parameters)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--elems-m", type=int, default=64, help="CPU part: elements (millions) per tensor")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_offload_phases: needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    from _bench_common import env_facts, gpu_facts, now_iso, write_json

    res: dict = dict(bench="offload_phases", started=now_iso(), argv=sys.argv, **env_facts(), **gpu_facts(),
                     omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch_threads=torch.get_num_threads(),
                     cores=os.cpu_count())
    res["pcie"] = pcie_part(torch, iters=10)
    write_json(args.out, res)
    res["cpu"] = cpu_part(torch, args.elems_m * 1_000_000, args.repeats)
    write_json(args.out, res)
    res["gpu_streamed_step"] = gpu_streamed_step(torch, 16 * 1024 * 1024, 8, args.repeats)
    write_json(args.out, res)
    res["engine_stream"] = engine_stream(torch, 24, 4096, args.repeats, res["pcie"]["h2d_gbps"])
    res["finished"] = now_iso()
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
