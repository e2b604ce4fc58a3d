"""Which DeepSpeed config keys tierlift maps, honours as-is, or cannot honour.

Tables only; the walk that uses them is ``tierlift.runtime.deepspeed_compat``.
Every DeepSpeed key falls in one of four classes:

* mapped: turned into a tierlift setting (the key sets in ``*_MAPPED``);
* fixed: tierlift always behaves like one value of the key, so that value is
  accepted and any other is reported (``*_FIXED``: key -> (accepted values, fix));
* no effect: a speed/logging knob whose purpose tierlift's design already serves;
  accepted and listed in the conversion notes (``*_NO_EFFECT``: key -> why);
* ignored: not honoured, but ignoring it cannot change the numbers trained
  (logging, DeepSpeed's checkpoint-file options); accepted and named once in a
  warning (``*_IGNORED``: key -> why).  A key both fixed and ignored is silent at
  its fixed value and ignored (not refused) at any other;
* unsupported: known to DeepSpeed, not honoured by tierlift, with a specific fix
  (``*_UNSUPPORTED``: key -> (message, fix)).  Any other key is reported as unknown
  with the nearest supported key.

``*_AUTO``: the mapped keys that may be "auto" (tierlift decides; a no-effect key
may always be "auto").
"""

from __future__ import annotations

# -- top level --------------------------------------------------------------
TOP_MAPPED = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "steps_per_print", "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "bfloat16",
    "communication_data_type", "zero_optimization", "aio", "activation_checkpointing",
})

TOP_FIXED = {
    "prescale_gradients": ((False,), "remove it: tierlift averages gradients after reducing them."),
    "gradient_predivide_factor": ((1,), "remove it: tierlift averages gradients after reducing them."),
    "sparse_gradients": ((False,), "remove it: tierlift reduces dense gradients only."),
    "memory_breakdown": ((False,), "remove it: tierlift's telemetry records memory per tier in run.dir."),
    "dump_state": ((False,), "remove it: render_config / the converted YAML shows the resolved config."),
}

TOP_AUTO = frozenset({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping"})

TOP_IGNORED = {
    "checkpoint": "DeepSpeed's checkpoint-file options; tierlift checkpoints are sharded, atomic and resume at "
                  "any world size",
    "memory_breakdown": "tierlift's telemetry records memory per tier in run.dir",
    "dump_state": "`tierlift config show` prints the resolved config",
}

TOP_NO_EFFECT = {
    "wall_clock_breakdown": "tierlift always records per-step timings in the run directory",
    "zero_allow_untested_optimizer": "tierlift only steps its own shard optimizers (AdamW, SGD)",
    "zero_force_ds_cpu_optimizer": "tierlift's CPU optimizer step is torch's fused AdamW",
}

# Monitors only write logs: enabled, they are ignored with a warning (tierlift writes its own metrics).
MONITORS = {
    "tensorboard": "tierlift writes metrics (Parquet) to run.dir; `tierlift report` plots them",
    "wandb": "tierlift writes metrics (Parquet) to run.dir; `tierlift report` plots them",
    "csv_monitor": "tierlift writes metrics (Parquet) to run.dir",
    "comms_logger": "tierlift's telemetry records collective timings",
    "flops_profiler": "tierlift reports tokens/s per step",
}

# Sections that are accepted only while switched off: {"enabled": false} (or, for MONITORS, ignored).
TOP_DISABLED_ONLY = {
    "tensorboard": "tierlift writes metrics (Parquet) to run.dir; remove the section.",
    "wandb": "tierlift writes metrics (Parquet) to run.dir; remove the section.",
    "csv_monitor": "tierlift writes metrics (Parquet) to run.dir; remove the section.",
    "comms_logger": "tierlift's telemetry records collective timings; remove the section.",
    "flops_profiler": "tierlift reports tokens/s and TFLOP/s per step; remove the section.",
    "amp": "use bf16 or fp16 instead of NVIDIA apex amp.",
}

TOP_UNSUPPORTED = {
    "data_types": ("is not supported: tierlift accumulates gradients in its own fixed dtypes.",
                   "remove the section."),
    "pipeline": ("is not supported: tierlift has no pipeline parallelism.", "remove the section."),
    "elasticity": ("is not supported: tierlift has no elastic batch sizes.", "remove the section."),
}

# -- zero_optimization ------------------------------------------------------
ZERO_MAPPED = frozenset({
    "stage", "offload_param", "offload_optimizer", "sub_group_size", "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters", "stage3_param_persistence_threshold", "stage3_max_reuse_distance",
    "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory",  # DeepSpeed's deprecated spellings
})
ZERO_AUTO = frozenset({"stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "sub_group_size",
                       "stage3_max_live_parameters", "stage3_max_reuse_distance"})
ZERO_IGNORED = {
    "ignore_unused_parameters": "tierlift tolerates unused parameters (their slice of the chunk gradient "
                                "stays zero); DeepSpeed's false only turns them into an error",
    "legacy_stage1": "a DeepSpeed implementation choice; the numbers are the same",
    "elastic_checkpoint": "tierlift checkpoints resume at any world size",
}

_COMM = ("tierlift reduces and gathers whole chunks, overlapped with compute, so DeepSpeed's "
         "bucketing and overlap knobs have nothing to tune")
ZERO_NO_EFFECT = {
    "overlap_comm": _COMM,
    "contiguous_gradients": _COMM,
    "reduce_bucket_size": _COMM,
    "allgather_bucket_size": _COMM,
    "reduce_scatter": _COMM,
    "allgather_partitions": _COMM,
    "use_multi_rank_bucket_allreduce": _COMM,
    "round_robin_gradients": _COMM,
    "stage3_model_persistence_threshold": "tierlift's persistence is per chunk (zero.persistence_threshold)",
    "memory_efficient_linear": "tierlift gathers parameters per wrap unit, not per linear layer",
    "stage3_gather_16bit_weights_on_model_save": "tierlift exports full weights with its safetensors export",
    "stage3_gather_fp16_weights_on_model_save": "tierlift exports full weights with its safetensors export",
    "log_trace_cache_warnings": "tierlift does not trace module order",
}

ZERO_FIXED = {
    "zero_quantized_weights": ((False,), "remove it: tierlift gathers unquantized weights."),
    "zero_quantized_nontrainable_weights": ((False,), "remove it: tierlift gathers unquantized weights."),
    "zero_quantized_gradients": ((False,), "remove it: tierlift reduces unquantized gradients."),
    "zero_hpz_partition_size": ((1,), "remove it: tierlift has no secondary (hpZ) partition."),
    "mics_shard_size": ((-1,), "remove it: tierlift shards over all ranks (no MiCS)."),
    "ignore_unused_parameters": ((True,), "remove it: tierlift tolerates unused parameters (their "
                                          "slice of the chunk gradient stays zero)."),
    "load_from_fp32_weights": ((True,), "remove it: tierlift always restores the fp32 master weights."),
    "elastic_checkpoint": ((False,), "remove it: tierlift checkpoints resume at any world size."),
    "legacy_stage1": ((False,), "remove it."),
    "compute_grad_norm": ((True,), "remove it: tierlift always computes the global gradient norm."),
}

ZERO_UNSUPPORTED: dict = {}

# -- offload_param / offload_optimizer --------------------------------------
OFFLOAD_MAPPED = {
    "param": frozenset({"device", "nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu"}),
    "optimizer": frozenset({"device", "nvme_path", "pin_memory", "buffer_count"}),
}
OFFLOAD_NVME_ONLY = frozenset({"nvme_path", "buffer_count", "buffer_size", "max_in_cpu"})
OFFLOAD_OPTIMIZER_NO_EFFECT = {
    "pipeline_read": "tierlift always overlaps NVMe reads and writes with the optimizer step",
    "pipeline_write": "tierlift always overlaps NVMe reads and writes with the optimizer step",
    "fast_init": "tierlift preallocates one extent file per rank at start",
}
OFFLOAD_OPTIMIZER_FIXED = {
    "ratio": ((1,), "remove it: tierlift offloads all or none of the optimizer state (partial "
                    "offload is not supported)."),
    "super_offload": ((False,), "remove it: tierlift has no Superchip-specific offload."),
}

# -- aio: DeepSpeed key -> AioConfig field ----------------------------------
AIO_MAPPED = {
    "block_size": "block_size",
    "queue_depth": "queue_depth",
    "intra_op_parallelism": "threads",
    "single_submit": "single_submit",
    "overlap_events": "overlap_events",
    "use_gds": "use_gds",
}
AIO_UNSUPPORTED = {
    "thread_count": (
        "is not a DeepSpeed aio setting any more (DeepSpeed ignores it silently).",
        "renamed intra_op_parallelism in DeepSpeed; tierlift maps intra_op_parallelism to "
        "offload.aio.threads, i.e. the aio.threads of each NVMe policy "
        "(offload.optimizer.aio.threads, offload.param.aio.threads)."),
}

# -- precision ---------------------------------------------------------------
FP16_MAPPED = frozenset({"enabled", "loss_scale", "initial_scale_power", "loss_scale_window",
                         "hysteresis", "min_loss_scale"})
FP16_FIXED = {
    "auto_cast": ((False,), "remove it: tierlift casts parameters to the compute dtype itself."),
    "consecutive_hysteresis": ((False,), "remove it: tierlift's hysteresis resets after each scale change."),
    "fp16_master_weights_and_grads": ((False,), "remove it: tierlift keeps fp32 master weights."),
}
BF16_MAPPED = frozenset({"enabled"})
BF16_FIXED = {
    "check_grad_overflow": ((False,), "remove it: tierlift skips steps on overflow only under fp16 "
                                      "loss scaling, never for bf16."),
    "bf16_master_weights_and_grads": ((False,), "remove it: tierlift keeps fp32 master weights."),
    "bf16_optimizer_states": ((False,), "remove it: tierlift keeps fp32 optimizer state."),
}
BF16_NO_EFFECT = {
    "immediate_grad_update": "tierlift moves each gradient shard to its optimizer as soon as it is reduced",
}

# -- optimizer / scheduler ---------------------------------------------------
# DeepSpeed's (torch's) defaults: a missing hyper-parameter must train the same numbers.
ADAM_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
SGD_DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0}
ADAM_FIXED = {
    "bias_correction": ((True,), "remove it: tierlift's AdamW always corrects bias."),
    "amsgrad": ((False,), "remove it: tierlift's AdamW does not support AMSGrad."),
}
ADAM_NO_EFFECT = {"torch_adam": "tierlift steps with torch's fused AdamW in any case",
                  "fused": "tierlift steps with torch's fused AdamW in any case"}
SGD_FIXED = {
    "dampening": ((0,), "remove it: tierlift's SGD has no dampening."),
    "nesterov": ((False,), "remove it: tierlift's SGD uses plain momentum."),
}
OPTIMIZER_PARAMS_UNSUPPORTED = {
    "max_grad_norm": ("is not an optimizer parameter (DeepSpeed rejects it too).",
                      "use the top-level gradient_clipping."),
}
OPTIMIZER_TYPES = ("Adam", "AdamW", "SGD")
OPTIMIZER_AUTO = frozenset({"lr", "betas", "eps", "weight_decay", "momentum"})

SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
SCHEDULER_PARAMS = {
    "WarmupLR": frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                           "last_batch_iteration"}),
    "WarmupDecayLR": frozenset({"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                                "warmup_type", "last_batch_iteration"}),
    "WarmupCosineLR": frozenset({"total_num_steps", "warmup_min_ratio", "warmup_num_steps",
                                 "cos_min_ratio", "warmup_type", "last_batch_iteration"}),
}
SCHEDULER_AUTO = frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps",
                            "warmup_min_ratio", "cos_min_ratio", "warmup_type"})
SCHEDULER_FIXED = {
    "last_batch_iteration": ((-1,), "remove it: tierlift resumes the schedule from its checkpoint's step."),
}

# Keys whose presence marks a mapping as DeepSpeed's (tierlift YAML has none of them).
MARKERS = (TOP_MAPPED - {"optimizer", "scheduler"}) | set(TOP_FIXED) | set(TOP_NO_EFFECT) \
    | set(TOP_DISABLED_ONLY) | set(TOP_IGNORED) | {"data_types", "elasticity"}


# -- activation_checkpointing ---------------------------------------------------
# The section's presence asks for checkpointing (train.activations.policy: recompute);
# cpu_checkpointing asks for activations in host memory too (policy: auto, which plans
# keep / swap to pinned host memory / recompute per unit under the GPU budget).
ACT_MAPPED = frozenset({"cpu_checkpointing"})
ACT_NO_EFFECT = {
    "partition_activations": "it splits checkpoints across model-parallel ranks; tierlift has no tensor "
                             "parallelism, so no activation is replicated across ranks",
    "contiguous_memory_optimization": "tierlift's swapped activations live in one pinned slab, sub-allocated "
                                      "per tensor; on the GPU torch's allocator holds them",
    "number_checkpoints": "it sizes DeepSpeed's contiguous buffer; tierlift checkpoints every wrap unit",
    "synchronize_checkpoint_boundary": "tierlift's executor synchronises nothing between units",
    "profile": "tierlift records act_recompute_ms and act_swap_stall_ms per step in the run's metrics",
}
