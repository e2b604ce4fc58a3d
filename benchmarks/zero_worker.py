"""One rank of the ZeRO-3 comparison: trains L1B (or a tiny twin) with one system.

    torchrun --standalone --nproc_per_node N benchmarks/zero_worker.py \
        --system {tierlift,deepspeed,fsdp2} --model {l1b,tiny} --steps S --warmup W \
        --mbs 8 --seq 1024 --out FILE [--offload none|cpu] [--device cuda|cpu]

Normally started by ``bench_zero.py``, which also samples host RSS from outside.
Every rank writes ``<FILE without .json>.rank<R>.json`` (also when it fails:
status "error" with the traceback) -- the ranks never need to talk to each other
after training, which matters for tierlift, whose Trainer owns its process group.

Common to all systems (so only the system differs): the same fp32 model built
on the CPU from one seed, the same batch, bf16 compute with fp32 master weights
and optimizer state, AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1
on matrices only -- tierlift's grouping), no gradient clipping, constant LR, full
activation checkpointing, micro-batch ``--mbs`` per rank, no gradient
accumulation.  ``--steps`` is the total number of optimizer steps; the first
``--warmup`` are excluded from the reported step time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

LR = 1e-4
BETAS = (0.9, 0.95)  # tierlift's default; passed explicitly to every system
EPS = 1e-8
WD = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", required=True, choices=["tierlift", "deepspeed", "fsdp2"])
    p.add_argument("--model", default="l1b", help="a preset (l1b, tiny) or llama-H-L")
    p.add_argument("--steps", type=int, default=8, help="total optimizer steps (warmup included)")
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the step time")
    p.add_argument("--mbs", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"],
                   help="nvme: DeepSpeed ZeRO-Infinity (params + optimizer on NVMe); tierlift optimizer "
                        "state on NVMe, bf16 parameters in host memory")
    p.add_argument("--nvme-dir", default="/tmp/tl-bench-nvme", help="NVMe tier directory (a subdir per system)")
    p.add_argument("--tl-run-dir", default=None,
                   help="tierlift: train with this run directory (metrics, telemetry, a final checkpoint) "
                        "instead of none -- for measuring what the run directory's writers cost")
    p.add_argument("--gpu-mem-gib", type=float, default=0.0,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction); 0 = none")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: gloo backend, for smoke tests without a GPU")
    p.add_argument("--seed", type=int, default=bc.DEFAULT_SEED)
    p.add_argument("--no-ac", dest="ac", action="store_false", help="disable activation checkpointing")
    p.add_argument("--ds-comm-dtype", default=None, choices=[None, "fp32", "bf16"],
                   help="DeepSpeed communication_data_type (default: DeepSpeed's own, bf16 grads under bf16)")
    p.add_argument("--tl-config", default=None,
                   help="JSON merged over the tierlift config dict (e.g. '{\"zero\": {\"prefetch_units\": 3}}')")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}) so some steps are timed")
    return a


def rank_out_path(out: str, rank: int) -> str:
    base = out[:-5] if out.endswith(".json") else out
    return f"{base}.rank{rank}.json"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _sync_fn(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed_steps(step_fn, steps: int, device, rec: dict) -> tuple[list[float], list[float], float]:
    """Run ``steps`` optimizer steps, each bracketed by a device sync so a step's
    time holds all of its GPU work and none of the next one's.  Losses are read
    after the loop (a .item() per step would add a sync we already pay, but
    keeping them as tensors keeps the timed region free of host conversions).
    rec["gpu_frag_bytes"]: reserved - allocated after each step (GPU), as tierlift's
    Trainer records it, so fragmentation over a run compares like for like."""
    import torch

    sync = _sync_fn(device)
    times, losses = [], []
    frag = rec["gpu_frag_bytes"] = []
    t_all = time.perf_counter()
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = step_fn()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
        if device.type == "cuda":
            frag.append(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    wall = time.perf_counter() - t_all
    return times, [float(x.float().cpu()) for x in losses], wall


def _init_dist(device):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist


# ---------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ---------------------------------------------------------------------------

def run_deepspeed(args, model, x, y, device, world, rec):
    import deepspeed
    import torch

    _init_dist(device)
    offload = args.offload in ("cpu", "nvme")
    if args.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = bc.decay_groups(model, WD)
    if offload:
        # ZeRO-Offload requires a DeepSpeed CPU optimizer (zero_force_ds_cpu_optimizer);
        # its op is JIT-built on first use (~45 s on the H100 box, outside the timed steps).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
        rec["optimizer_impl"] = "DeepSpeedCPUAdam"
    else:
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=fused)
        rec["optimizer_impl"] = f"torch.optim.AdamW(fused={fused})"
    zero = {"stage": 3}  # everything else: DeepSpeed's stage-3 defaults
    if args.offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif args.offload == "nvme":  # ZeRO-Infinity: both on NVMe, DeepSpeed's defaults otherwise
        path = os.path.join(args.nvme_dir, "deepspeed")
        os.makedirs(path, exist_ok=True)
        zero["offload_param"] = {"device": "nvme", "nvme_path": path, "pin_memory": True}
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": path, "pin_memory": True}
    ds_config = {
        "train_micro_batch_size_per_gpu": args.mbs,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if args.ds_comm_dtype:
        ds_config["communication_data_type"] = args.ds_comm_dtype
    if args.offload == "nvme":  # the same request size and depth as tierlift's engine defaults
        ds_config["aio"] = {"block_size": 8 << 20, "queue_depth": 8, "intra_op_parallelism": 4,
                            "single_submit": False, "overlap_events": True}
    rec["ds_config"] = ds_config
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    def step():
        loss = engine(input_ids=x, labels=y, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return loss

    return _timed_steps(step, args.steps, device, rec)


# ---------------------------------------------------------------------------
# PyTorch FSDP2
# ---------------------------------------------------------------------------

def run_fsdp2(args, model, x, y, device, world, rec):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _init_dist(device)
    offload = args.offload == "cpu"
    if args.ac:
        # before sharding: HF wraps each decoder layer's call in non-reentrant
        # torch.utils.checkpoint, which re-runs FSDP2's pre-forward gather on recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if offload:
        # pinned on GPU runs (the measured configuration); a CPU smoke run has no
        # accelerator to pin for, and only exercises the code path
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # One FSDP unit per decoder layer (the model's _no_split_modules), then the
    # root for embeddings / final norm / lm_head -- the standard FSDP2 recipe.
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    # Param groups after sharding: the parameters are now DTensors.
    fused = device.type == "cuda" and not offload
    opt = torch.optim.AdamW(bc.decay_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                            **({"fused": True} if fused else {}))
    rec["optimizer_impl"] = "torch.optim.AdamW(fused=True)" if fused else "torch.optim.AdamW(default foreach/for-loop)"
    state = {"opt": opt, "first": True}

    def step():
        loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        try:
            state["opt"].step()
        except RuntimeError as exc:
            # Fused AdamW over DTensor shards is supported on current torch; if this
            # build refuses it, fall back rather than lose the run -- the kernel check
            # fires before any parameter is touched -- and say so in the record.
            if not (state["first"] and fused):
                raise
            rec["optimizer_impl"] = f"torch.optim.AdamW(foreach) -- fused refused: {str(exc)[:200]}"
            state["opt"] = torch.optim.AdamW(bc.decay_groups(model, WD), lr=LR, betas=BETAS, eps=EPS,
                                             weight_decay=WD, foreach=True)
            state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)
        state["first"] = False
        return loss

    return _timed_steps(step, args.steps, device, rec)


# ---------------------------------------------------------------------------
# tierlift ZeRO-3
# ---------------------------------------------------------------------------

def tierlift_config(args, device, run_dir) -> dict:
    cfg = {
        "zero": {"stage": 3},
        "precision": {"compute": "bf16", "reduce": "fp32"},
        "optimizer": {"name": "adamw", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                      "grad_clip": 0.0},
        "train": {"micro_batch_size": args.mbs, "grad_accum_steps": 1, "max_steps": args.steps,
                  "activation_checkpointing": bool(args.ac), "log_every": 1000, "seed": args.seed},
        "scheduler": {"kind": "constant"},
        # No shuffle: the sample list is the global batch repeated once per step,
        # so in index order every step sees exactly the batch the peers see, rank r
        # taking rows [r*mbs, (r+1)*mbs) (StepBatcher is rank-major).  A shuffle
        # would mix copies and put duplicate rows into a step.
        "data": {"shuffle": False},
        "run": {"device": device.type, "dir": run_dir},
    }
    if args.offload == "cpu":
        cfg["offload"] = {"optimizer": {"kind": "cpu"}, "param": {"kind": "cpu"}}
    elif args.offload == "nvme":
        cfg["offload"] = {"optimizer": {"kind": "nvme", "path": os.path.join(args.nvme_dir, "tierlift")},
                          "param": {"kind": "cpu"}}
    if args.tl_config:
        cfg = _deep_merge(cfg, json.loads(args.tl_config))
    return cfg


def run_tierlift(args, model, ids, labels, device, world, rec):
    """tierlift gets the model and the *global* batch as a list of samples, one
    copy of the global batch per step, in rank order -- its data path hands
    rank r its share; the Trainer times its own steps (CUDA-synchronised)."""
    from tierlift import TrainConfig, Trainer

    # Trainer(run_dir=None) writes nothing (no metrics, no final checkpoint, which
    # for L1B would be ~11 GB of I/O and host memory inside the measured run);
    # run.dir is only the config's record of where a CLI run would write.
    run_dir = os.path.join(tempfile.gettempdir(), "tl-bench-run")
    cfg_dict = tierlift_config(args, device, run_dir)
    rec["tierlift_config"] = cfg_dict
    cfg = TrainConfig.from_dict(cfg_dict)
    n = ids.shape[0]
    # tierlift's label rule: labels[:, i] is the target of position i (already shifted).  The
    # peers get HF's convention (labels == input_ids, the model shifts); this is the same loss:
    # position i predicts token i + 1, the last position has no target.
    import torch
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    samples = [{"input_ids": ids[i], "labels": shifted[i]} for _ in range(args.steps) for i in range(n)]
    if args.tl_run_dir:
        rec["tl_run_dir"] = args.tl_run_dir
    trainer = Trainer(model, cfg, train_data=samples, run_dir=args.tl_run_dir)
    t0 = time.perf_counter()
    summary = trainer.fit(max_steps=args.steps)
    wall = time.perf_counter() - t0

    def field(name):
        v = getattr(summary, name, None)
        if v is None and isinstance(summary, dict):
            v = summary.get(name)
        if v is None:
            raise RuntimeError(f"Trainer.fit() summary has no {name!r} (got {type(summary).__name__}: "
                               f"{sorted(vars(summary)) if hasattr(summary, '__dict__') else summary!r})")
        return [float(t) for t in v]

    step_times, losses = field("step_times"), field("losses")
    # tierlift's own view of its memory, a cross-check on the harness's numbers.
    rec["tierlift_summary"] = {k: getattr(summary, k) for k in (
        "tokens_per_s", "peak_gpu_alloc_bytes", "peak_gpu_reserved_bytes", "peak_host_rss_bytes", "pinned_bytes",
        "grad_norms", "offload_busy_s", "gpu_frag_bytes", "arena_growth_bytes") if hasattr(summary, k)}
    acts = getattr(trainer.engine, "activations", None)
    if acts is not None and acts.plan is not None:  # the activation plan the run executed, and its prediction
        p = acts.plan
        rec["activation_plan"] = {"policy": p.policy, "predicted_step_s": p.predicted_step_s,
                                  "predicted_peak_bytes": p.predicted_peak_bytes, "recompute_s": p.recompute_s,
                                  "swap_stall_s": p.swap_stall_s, "swapped_bytes": p.swapped_bytes,
                                  "feasible": p.feasible, "decisions": p.to_json(), "replans": acts.replans}
    if len(step_times) != args.steps:
        rec.setdefault("warnings", []).append(f"summary.step_times has {len(step_times)} entries, "
                                              f"expected {args.steps}")
    return step_times, losses, wall


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    out_path = rank_out_path(args.out, rank)
    rec: dict = {"system": args.system, "rank": rank, "world": world, "local_rank": local_rank,
                 "pid": os.getpid(), "args": vars(args), "status": "started", "started": bc.now_iso()}
    t_start = time.perf_counter()
    try:
        import torch

        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)  # so tierlift's and the peers' current device agree
            if args.gpu_mem_gib:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_mem_gib * 2 ** 30 / total), device)
                rec["gpu_mem_cap_gib"] = args.gpu_mem_gib
        else:
            device = torch.device("cpu")
        # Import the system under test before building a 1B model: a broken install
        # then fails within seconds instead of after the model build.
        if args.system == "deepspeed":
            import deepspeed

            rec["deepspeed_version"] = deepspeed.__version__
        elif args.system == "tierlift":
            from tierlift import TrainConfig, Trainer  # noqa: F401

        t0 = time.perf_counter()
        model = bc.build_model(args.model, args.seq, args.seed)
        rec["build_model_s"] = time.perf_counter() - t0
        rec["n_params"] = bc.count_params(model)
        vocab = model.config.vocab_size
        ids, labels = bc.make_global_batch(vocab, world, args.mbs, args.seq, args.seed)

        t0 = time.perf_counter()
        if args.system == "tierlift":
            step_times, losses, wall = run_tierlift(args, model, ids, labels, device, world, rec)
        else:
            x = bc.rank_slice(ids, rank, args.mbs).to(device)
            y = bc.rank_slice(labels, rank, args.mbs).to(device)
            fn = run_deepspeed if args.system == "deepspeed" else run_fsdp2
            step_times, losses, wall = fn(args, model, x, y, device, world, rec)
        rec["setup_and_train_s"] = time.perf_counter() - t0
        rec["train_wall_s"] = wall
        rec["step_times_s"] = step_times
        rec["losses"] = losses
        timed = step_times[args.warmup:]
        rec["median_step_s"] = bc.median(timed)
        rec.update(bc.gpu_stats(device))
        rec["pinned_host"] = bc.pinned_host_stats()
        rec["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 -- record everything, then re-raise
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rec["traceback"] = traceback.format_exc()[-6000:]
        try:
            rec.update(bc.gpu_stats(device))  # noqa: F821 -- may not exist yet
        except Exception:
            pass
        raise
    finally:
        rec["total_s"] = time.perf_counter() - t_start
        rec["finished"] = bc.now_iso()
        if rank == 0:
            rec["env"] = bc.env_facts()
            try:
                rec.update(bc.gpu_facts())
            except Exception:
                pass
        bc.write_json(out_path, rec)
        if rec["status"] == "ok" and rank == 0:
            print(f"[zero_worker] {args.system} model={args.model} world={world} "
                  f"median_step={rec['median_step_s']:.4f}s loss0={rec['losses'][0]:.4f} "
                  f"peak_alloc={rec.get('peak_gpu_alloc_gib')}", flush=True)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
