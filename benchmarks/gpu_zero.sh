#!/usr/bin/env bash
# The single device command for the ZeRO-3 comparison (tierlift vs DeepSpeed vs FSDP2 on L1B).
#
#   device run:  command "bash benchmarks/gpu_zero.sh", carry [".whl"], timeout_s 600
#                kind nvidia-h100-x1 (1 GPU) or nvidia-h200-x2 (1 and 2 GPUs in one call)
#
# Steps: set up the bare machine (benchmarks/setup_device.sh), print what it is,
# smoke-test every system on the tiny model (catches a broken install in seconds),
# then the L1B sweep.  Results go straight to $OUT (the only folder that comes
# back), rewritten after every run, so a call cut off at its limit still returns
# what finished.  $OUT gets at most 6 files (the device returns 8):
#   gpu_zero.log, zero_smoke_<tag>.{json,md}, zero_<tag>.{json,md}, zero_logs_<tag>.tgz
# Copy the JSON/MD you keep into benchmarks/results/.
#
# Knobs (environment): GPUS (default 1, or 1,2 with >= 2 GPUs), SYSTEMS
# (tierlift,deepspeed,fsdp2), STEPS (8), WARMUP (3), REPEATS (1; odd repeats run
# the systems in reverse order), OFFLOAD (none|cpu), SMOKE (1; 0 skips it), SMOKE_GPUS
# (the last of GPUS),
# BUDGET_S (570: the whole script must end inside the device's 600 s), TL_CONFIG
# (JSON merged over tierlift's config, e.g. '{"zero": {"prefetch_units": 3}}'),
# EXTRA (more bench_zero.py flags for both sweeps, split on spaces, e.g. "--ds-comm-dtype fp32").
# DEVICE=cpu MODEL=tiny with a stand-in nvidia-smi dry-runs the script off-device.

set -u -o pipefail
T0=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-$PWD/benchmarks/results/_device_out}"
mkdir -p "$OUT"

main() {
echo "=== gpu_zero.sh $(date -u +%FT%TZ) in $PWD"
# shellcheck source=benchmarks/setup_device.sh
source benchmarks/setup_device.sh || { echo "setup failed"; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # no network there; fail fast

echo "=== machine"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv || true
nvidia-smi topo -m 2>/dev/null | head -8 || true
echo "cores: $(nproc); memory: $(free -g | awk '/Mem:/{print $2}') GiB; disk /tmp: $(df -h /tmp | awk 'NR==2{print $4}') free"
python3 - <<'EOF' || { echo "python stack broken"; exit 1; }
import importlib, sys, time
t = time.time()
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__} cuda {torch.version.cuda} "
      f"gpus {torch.cuda.device_count()} {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for m in ("transformers", "deepspeed", "pydantic", "hjson", "psutil", "pynvml", "tierlift"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '?')} from {getattr(mod, '__file__', '?')}")
    except Exception as exc:
        print(f"  {m}: IMPORT FAILED: {type(exc).__name__}: {exc}")
print(f"  (imports took {time.time() - t:.1f} s)")
EOF

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPUS="${GPUS:-$([ "$NGPU" -ge 2 ] && echo 1,2 || echo 1)}"
SYSTEMS="${SYSTEMS:-tierlift,deepspeed,fsdp2}"
STEPS="${STEPS:-8}"; WARMUP="${WARMUP:-3}"; REPEATS="${REPEATS:-1}"; OFFLOAD="${OFFLOAD:-none}"
BUDGET_S="${BUDGET_S:-570}"; SMOKE="${SMOKE:-1}"; EXTRA="${EXTRA:-}"; TL_CONFIG="${TL_CONFIG:-}"
# The smoke runs only the largest GPU count: it exercises NCCL and the multi-rank
# paths, and one tiny run per system is enough to catch a broken install.
SMOKE_GPUS="${SMOKE_GPUS:-${GPUS##*,}}"
DEVICE="${DEVICE:-cuda}"; MODEL="${MODEL:-l1b}"  # cpu / tiny: only for dry-running this script off-device
GPUNAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$GPUNAME" in *H200*) G=h200 ;; *H100*) G=h100 ;; *) G=gpu ;; esac
TAG="${G}x${NGPU}$([ "$OFFLOAD" != none ] && echo "_offload-$OFFLOAD")"
LOGS=/tmp/zero_logs_$TAG   # many small files: outside $OUT (8-file limit), tarred at the end
mkdir -p "$LOGS"

# Seconds left for the sweeps, 20 s kept for the tar and the listing; never 0
# (bench_zero.py reads --budget 0 as "no budget").
left() { local l=$(( BUDGET_S - (SECONDS - T0) - 20 )); echo $(( l < 1 ? 1 : l )); }

if [ "$SMOKE" = 1 ]; then
    echo "=== smoke: tiny model, $SYSTEMS on $SMOKE_GPUS GPU(s)  ($(left) s left)"
    # shellcheck disable=SC2086
    python3 benchmarks/bench_zero.py --gpus "$SMOKE_GPUS" --systems "$SYSTEMS" --model tiny --steps 3 --warmup 1 \
        --offload "$OFFLOAD" --device "$DEVICE" --timeout 150 --budget "$(( $(left) < 150 ? $(left) : 150 ))" --min-run-s 20 \
        --out "$OUT/zero_smoke_$TAG.json" --logdir "$LOGS/smoke" ${TL_CONFIG:+--tl-config "$TL_CONFIG"} $EXTRA \
        || echo "=== smoke: some runs failed (see above); going on with L1B anyway"
fi

echo "=== $MODEL: $SYSTEMS on $GPUS GPU(s), $STEPS steps ($WARMUP warm-up), offload $OFFLOAD, repeats $REPEATS  ($(left) s left)"
# shellcheck disable=SC2086
python3 benchmarks/bench_zero.py --gpus "$GPUS" --systems "$SYSTEMS" --model "$MODEL" --steps "$STEPS" \
    --warmup "$WARMUP" --repeats "$REPEATS" --offload "$OFFLOAD" --device "$DEVICE" --timeout 240 --budget "$(left)" --min-run-s 45 \
    --out "$OUT/zero_$TAG.json" --logdir "$LOGS/l1b" ${TL_CONFIG:+--tl-config "$TL_CONFIG"} $EXTRA \
    || echo "=== $MODEL: some runs failed or were skipped (see the table)"

tar czf "$OUT/zero_logs_$TAG.tgz" -C /tmp "$(basename "$LOGS")" 2>/dev/null || true
echo "=== done in $(( SECONDS - T0 )) s; \$OUT:"
ls -la "$OUT"
}

# tee, not exec-redirection: tee has finished when the script returns, and
# what it wrote so far is in $OUT even if the device kills the call.
main 2>&1 | tee -a "$OUT/gpu_zero.log"
