#!/usr/bin/env bash
# One device call that sets up the GPU machine and runs several stages in order,
# each bounded so the call ends inside the device's 600 s:
#
#   device run: command "STAGES=tests,phases,zero bash benchmarks/gpu_session.sh",
#               carry [".whl"], kind nvidia-h100-x1
#
# Stages (environment STAGES, comma-separated, in this order):
#   tests   the GPU-marked tests (pytest -m gpu), log in $OUT/gpu_tests.log
#   phases  benchmarks/bench_offload_phases.py -> $OUT/offload_phases.json
#   pinned  benchmarks/bench_pinned.py -> $OUT/pinned.json
#   zero    benchmarks/gpu_zero.sh with what is left of the budget (its knobs:
#           GPUS, SYSTEMS, OFFLOAD, STEPS, TL_CONFIG, EXTRA, SMOKE -- default 0 here)
# TOTAL_S (default 580) bounds the whole call.
set -u -o pipefail
T0=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-$PWD/benchmarks/results/_device_out}"
mkdir -p "$OUT"
STAGES="${STAGES:-tests,phases,zero}"
TOTAL_S="${TOTAL_S:-580}"
left() { echo $(( TOTAL_S - (SECONDS - T0) )); }
has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# shellcheck source=benchmarks/setup_device.sh
source benchmarks/setup_device.sh || { echo "setup failed"; exit 1; }
echo "=== setup done at $(( SECONDS - T0 )) s"
if has tests; then
    echo "=== stage tests ($(left) s left)"
    timeout 150 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
fi
if has phases; then
    echo "=== stage phases ($(left) s left)"
    timeout 150 python3 benchmarks/bench_offload_phases.py --out "$OUT/offload_phases.json" 2>&1 | tail -30
fi
if has pinned; then
    echo "=== stage pinned ($(left) s left)"
    timeout 90 python3 benchmarks/bench_pinned.py --out "$OUT/pinned.json" --sizes-mib 256,1126 --repeats 1 2>&1 | tail -12
fi
if has zero; then
    echo "=== stage zero ($(left) s left)"
    SMOKE="${SMOKE:-0}" BUDGET_S="$(( $(left) - 10 ))" OUT="$OUT" bash benchmarks/gpu_zero.sh
    python3 - "$OUT" <<'PY' || true
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/zero_*.json")):
    for r in json.load(open(f)).get("runs", []):
        if r.get("tierlift_summary"):
            s = r["tierlift_summary"]
            print(f"tierlift {r['gpus']} GPU: steps {[round(t, 3) for t in r.get('step_times_s', [])]}")
            print(f"  busy {({k: round(v, 3) for k, v in (s.get('offload_busy_s') or {}).items()})}")
            print(f"  pinned {s.get('pinned_bytes', 0) / 2**30:.2f} GiB, own peak RSS {s.get('peak_host_rss_bytes', 0) / 2**30:.2f} GiB")
PY
fi
echo "=== session done in $(( SECONDS - T0 )) s"
