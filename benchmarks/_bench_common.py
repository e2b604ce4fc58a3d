"""Shared pieces of the ZeRO benchmark (driver ``bench_zero.py``, worker ``zero_worker.py``).

Everything that must be *identical* across the compared systems lives here, so a
difference in the numbers can only come from the system under test:

* the model (``build_model``): Hugging Face ``LlamaForCausalLM``, fp32 weights,
  initialised on the CPU from one seed -- the same weights in every system and
  on every rank, so the first step's loss must agree across systems;
* the batch (``make_global_batch`` / ``rank_slice``): one deterministic global
  batch of ``world * mbs`` sequences, rank r taking rows [r*mbs, (r+1)*mbs); the
  1-GPU batch is the first half of the 2-GPU one;
* measurement helpers: a host-RSS sampler for a process tree (the driver's
  view, 20 Hz), GPU allocator peaks (the worker's view), JSON writing.

No tierlift import here: the harness must run (and measure the peers) even
when tierlift is broken.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

GiB = float(1 << 30)

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

# "l1b" is design.md section 4's anchor (0.934 B params).  "tiny" keeps the same
# architecture but small enough for CPU smoke runs; its vocabulary is cut to
# 1024 as well, because the logits (mbs * seq * vocab floats) dominate memory
# and time of a tiny model on 2 shared cores.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "l1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                intermediate_size=5440, vocab_size=32000, max_position_embeddings=1024),
    # ~7B Llama-shaped (Llama-2-7B's widths), issue 6's second model: 6.74 B params
    "l7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=176, vocab_size=1024, max_position_embeddings=1024),
    # Issue 14's Qwen3-MoE shape (transformers' Qwen3MoeForCausalLM): 64 experts, top-8, hidden 1536,
    # expert intermediate 512, 16 layers, every layer sparse; 2.61 B params with a 32000 vocabulary.
    "qwen3moe": dict(arch="qwen3_moe", hidden_size=1536, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=4, head_dim=128, moe_intermediate_size=512, intermediate_size=4096,
                     num_experts=64, num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True,
                     vocab_size=32000, max_position_embeddings=1024),
    "tiny-qwen3moe": dict(arch="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, intermediate_size=128,
                          num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                          vocab_size=1024, max_position_embeddings=1024),
}

DEFAULT_SEED = 1234


def model_preset(name: str) -> dict[str, Any]:
    """A preset, or ``llama-H-L``: L1B's shape at hidden H and L layers (heads of 128,
    intermediate 2.656 x H rounded to 64, as L1B's 5440 / 2048) -- the sizes of the
    largest-model search."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "llama" and parts[1].isdigit() and parts[2].isdigit():
        h, layers = int(parts[1]), int(parts[2])
        if h % 128 == 0 and layers > 0:
            inter = round(h * 5440 / 2048 / 64) * 64
            return dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=h // 128,
                        num_key_value_heads=h // 128, intermediate_size=inter, vocab_size=32000,
                        max_position_embeddings=1024)
    raise SystemExit(f"unknown --model {name!r}; choose from {sorted(MODEL_PRESETS)} or llama-H-L "
                     "(hidden H a multiple of 128, L layers)")


def model_config(name: str, seq: int):
    import transformers

    kw = dict(model_preset(name))
    arch = kw.pop("arch", "llama")
    # A longer --seq than the preset's table would silently index past RoPE's cache.
    kw["max_position_embeddings"] = max(kw["max_position_embeddings"], seq)
    cls = {"llama": transformers.LlamaConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[arch]
    return cls(**kw, attn_implementation="sdpa", use_cache=False)


def build_model(name: str, seq: int, seed: int = DEFAULT_SEED):
    """The preset's fp32 causal LM (LlamaForCausalLM, or Qwen3MoeForCausalLM for the MoE
    presets) on the CPU, initialised from ``seed``.

    Built on the CPU (not on a GPU, not on meta) because that is the one place
    every system accepts it and where the RNG stream is device-independent:
    identical weights in tierlift, DeepSpeed and FSDP2 on any machine.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(name, seq)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def decay_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups the way tierlift's optimizer does it (OptimizerConfig's doc):
    weight decay on matrices, none on 1-D parameters (norm weights, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------

def make_global_batch(vocab: int, world: int, mbs: int, seq: int, seed: int = DEFAULT_SEED):
    """(input_ids, labels) of shape [world*mbs, seq], int64, on the CPU.

    Uniform random tokens from a private generator (it does not disturb the
    model-init RNG).  labels == input_ids: HF causal LMs shift internally, and
    every position is a valid target, so each rank's mean loss has the same
    token count and the global loss is the plain mean of the ranks' losses.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (world * mbs, seq), generator=g, dtype=torch.long)
    return ids, ids.clone()


def rank_slice(t, rank: int, mbs: int):
    return t[rank * mbs:(rank + 1) * mbs]


# ---------------------------------------------------------------------------
# GPU / environment facts (worker side)
# ---------------------------------------------------------------------------

def gpu_stats(device) -> dict[str, Any]:
    """Peak allocator memory of this process on ``device`` (None on CPU runs).

    max_memory_allocated is what the issue compares; reserved shows the caching
    allocator's fragmentation; mem_get_info's "used" covers memory outside the
    allocator too (CUDA context, NCCL buffers, raw cudaMalloc) at the moment of
    the call.
    """
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {"peak_gpu_alloc_gib": None, "peak_gpu_reserved_gib": None, "gpu_used_at_end_gib": None}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "peak_gpu_alloc_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
        "gpu_used_at_end_gib": (total - free) / GiB,
        "gpu_total_gib": total / GiB,
    }


def pinned_host_stats() -> dict[str, Any]:
    """Pinned host memory through PyTorch's caching host allocator (tensor.pin_memory(),
    pin_memory=True allocations).  Memory pinned by cudaHostRegister/cudaHostAlloc
    outside PyTorch is not in here; it still shows in RSS once touched."""
    import torch

    fn = getattr(getattr(torch.cuda, "memory", None), "host_memory_stats", None)
    if fn is None or not torch.cuda.is_available():
        return {}
    try:
        s = fn()
    except Exception as exc:  # older builds / no CUDA context
        return {"error": repr(exc)}
    # Key names vary across torch versions ("allocated_bytes.peak", "active_bytes.peak", ...):
    # keep every byte counter's current and peak.
    return {k.replace("_bytes", "_gib"): v / GiB for k, v in s.items()
            if "_bytes." in k and k.endswith((".current", ".peak"))}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tierlift_version() -> str | None:
    """The version of the checkout being measured.  The GPU machine runs tierlift
    from PYTHONPATH, not an installed distribution, so metadata has none: read
    ``__version__`` from the source without importing it (importing pulls torch)."""
    try:
        with open(os.path.join(REPO, "tierlift", "__init__.py"), encoding="utf-8") as f:
            m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
        return m.group(1) if m else None
    except OSError:
        return None


def tierlift_commit() -> str | None:
    """The commit that made a result: ``TL_COMMIT`` (set by whoever sends the tree to
    a machine without .git, e.g. the device call) or ``git rev-parse HEAD`` here,
    with ``+dirty`` when the working tree differs from it."""
    env = os.environ.get("TL_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def env_facts() -> dict[str, Any]:
    """Versions and hardware, read without importing the peers (cheap, and a
    broken peer must not stop the facts from being written)."""
    from importlib import metadata

    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": ver("torch"),
        "deepspeed": ver("deepspeed"),
        "transformers": ver("transformers"),
        "tierlift": ver("tierlift") or tierlift_version(),
        "tierlift_commit": tierlift_commit(),
        "env": {k: os.environ.get(k) for k in (
            "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
            "TORCH_CUDA_ARCH_LIST", "OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")},
    }
    return facts


def gpu_facts() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu_name": None, "gpu_count": 0, "cuda": None}
    p = torch.cuda.get_device_properties(0)
    return {"gpu_name": p.name, "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "gpu_total_gib": p.total_memory / GiB, "torch_runtime": torch.__version__}


# ---------------------------------------------------------------------------
# Host memory sampling (driver side)
# ---------------------------------------------------------------------------

@dataclass
class _ProcInfo:
    pid: int
    ppid: int
    name: str
    rank: int | None
    is_rank: bool = False  # a rank itself, not a child of one (a JIT compiler inherits RANK too)
    peak_rss: int = 0


class TreeRSSSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants at ``hz``.

    Runs in the driver (outside the measured processes, so it perturbs none of
    them except for /proc reads).  Records, per sample, the RSS of every live
    process; from that it derives the peak of the tree's total, the peak of the
    ranks' total (torchrun's agent and compiler subprocesses excluded) and the
    peak of each process.  Ranks are recognised by the RANK variable torchrun
    puts in their environment (and a parent without it: compilers a rank spawns
    inherit RANK but count as "other" processes, still inside the tree total).

    Optionally also samples device-wide GPU memory in use through NVML (the
    "used" counter nvidia-smi shows: allocator + CUDA context + NCCL + raw
    cudaMalloc), a cross-check on the allocator peaks the workers report.
    """

    def __init__(self, root_pid: int, hz: float = 20.0, nvml: bool = False):
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self.root_pid = root_pid
        self.period = 1.0 / hz
        self._stop_evt = threading.Event()
        self.procs: dict[int, _ProcInfo] = {}
        self.peak_total = 0
        self.peak_ranks_total = 0
        self.samples = 0
        self.started_at = time.time()
        self._nvml = None
        self.peak_gpu_used: dict[int, int] = {}
        if nvml:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                n = pynvml.nvmlDeviceGetCount()
                self._nvml = (pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)])
            except Exception:
                self._nvml = None

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)

    def _rank_of(self, p) -> int | None:
        try:
            r = p.environ().get("RANK")
            return int(r) if r is not None else None
        except Exception:
            return None

    def run(self) -> None:
        psutil = self._psutil
        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        while not self._stop_evt.is_set():
            t0 = time.perf_counter()
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                tree = []
            total = ranks_total = 0
            for p in tree:
                try:
                    rss = p.memory_info().rss
                    info = self.procs.get(p.pid)
                    if info is None:
                        info = _ProcInfo(p.pid, p.ppid(), p.name(), self._rank_of(p))
                        self.procs[p.pid] = info
                    elif info.rank is None and info.pid != self.root_pid:
                        # environ may not be readable in the first instant after fork/exec
                        info.rank = self._rank_of(p)
                    if info.rank is not None and not info.is_rank and info.pid != self.root_pid:
                        parent = self.procs.get(info.ppid)
                        info.is_rank = parent is None or parent.rank is None
                except psutil.Error:
                    continue
                info.peak_rss = max(info.peak_rss, rss)
                total += rss
                if info.is_rank:
                    ranks_total += rss
            self.peak_total = max(self.peak_total, total)
            self.peak_ranks_total = max(self.peak_ranks_total, ranks_total)
            if self._nvml is not None:
                pynvml, handles = self._nvml
                for i, h in enumerate(handles):
                    try:
                        used = pynvml.nvmlDeviceGetMemoryInfo(h).used
                    except Exception:
                        continue
                    self.peak_gpu_used[i] = max(self.peak_gpu_used.get(i, 0), used)
            self.samples += 1
            self._stop_evt.wait(max(0.0, self.period - (time.perf_counter() - t0)))

    def result(self) -> dict[str, Any]:
        per_rank: dict[str, float] = {}
        others = []
        for info in self.procs.values():
            if info.is_rank:
                # one rank may be restarted by torchrun; keep the largest
                k = str(info.rank)
                per_rank[k] = max(per_rank.get(k, 0.0), info.peak_rss / GiB)
            else:
                others.append({"pid": info.pid, "name": info.name, "peak_rss_gib": info.peak_rss / GiB})
        others.sort(key=lambda d: -d["peak_rss_gib"])
        return {
            "peak_rss_gib_tree_total": self.peak_total / GiB,
            "peak_rss_gib_ranks_total": self.peak_ranks_total / GiB,
            "peak_rss_gib_per_rank": dict(sorted(per_rank.items(), key=lambda kv: int(kv[0]))),
            "peak_rss_gib_other_processes": others[:6],
            "rss_samples": self.samples,
            "rss_sample_hz": 1.0 / self.period,
            "peak_gpu_used_gib_nvml": ({str(i): v / GiB for i, v in sorted(self.peak_gpu_used.items())}
                                       if self._nvml is not None else None),
        }


# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------

def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Atomic (write + rename): a reader never sees half a file, and a crash
    leaves the previous result intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x / 1000:.1f}k"
        return f"{x:.{nd}f}"
    return str(x)


def llama_params(name: str) -> int:
    """Parameters of a preset or llama-H-L without building it (untied embeddings;
    q/k/v/o with kv heads = heads; gate/up/down; two RMSNorms per layer and a final one)."""
    p = model_preset(name)
    h, layers, inter, vocab = p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"], p["vocab_size"]
    kv = h * p["num_key_value_heads"] // p["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return 2 * vocab * h + layers * per_layer + h


def write_report(out_dir: str, stem: str, md_lines: list[str], obj: Any) -> None:
    """A device-session report: OUT_DIR/STEM.md (printed too) and OUT_DIR/STEM.json (atomic).
    Both record the tierlift version, the commit and the command that made them, so a
    result can always be tied to the code (issue 11)."""
    made_by = {"tierlift": tierlift_version(), "tierlift_commit": tierlift_commit(),
               "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)}
    if isinstance(obj, dict):
        obj = {**made_by, **obj}
    md_lines = list(md_lines) + ["", f"_tierlift {made_by['tierlift']} at commit {made_by['tierlift_commit']}; "
                                     f"made by `{made_by['command']}`_"]
    text = "\n".join(md_lines).rstrip("\n") + "\n"
    with open(os.path.join(out_dir, stem + ".md"), "w", encoding="utf-8") as f:
        f.write(text)
    write_json(os.path.join(out_dir, stem + ".json"), obj)
    print(text, end="")
