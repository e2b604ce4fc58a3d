#!/usr/bin/env bash
# One device call that sets up the GPU machine and runs several stages in order,
# each bounded so the call ends inside the device's 600 s:
#
#   device run: command "STAGES=tests,phases,zero bash benchmarks/gpu_session.sh",
#               carry [".whl"], kind nvidia-h100-x1
#
# Stages (environment STAGES, comma-separated; they run in the order listed here):
#   tests   the GPU-marked tests (pytest -m gpu), log in $OUT/gpu_tests.log
#   arena   L1B, tierlift with zero.arena pool vs shared (and DeepSpeed), for each of ARENA_OFFLOAD
#           (none,cpu): fragmentation per step; report -> $OUT/arena.md
#   phases  benchmarks/bench_offload_phases.py -> $OUT/offload_phases.json
#   pinned  benchmarks/bench_pinned.py -> $OUT/pinned.json
#   plan    tierlift doctor --calibrate, then tierlift plan of benchmarks/configs/l1b-offload-*.yaml
#   engine  NVMe engine vs DeepSpeed aio alone, ENGINE_REPEATS (5) alternating repeats -> $OUT/nvme_engine.json
#   nvme    NVMe engine vs DeepSpeed aio; L1B with the optimizer on NVMe vs ZeRO-Infinity; L1B with
#           the planner's placement under PLAN_HOST_BUDGET (30GiB); report -> $OUT/nvme_l1b.md
#   largest issue 4's largest model under 16 GiB GPU / 24 GiB host (cgroup) caps, ZeRO-Infinity vs
#           tierlift (LARGEST="system:model:timeout ..."); report -> $OUT/largest_model.md
#   zero    benchmarks/gpu_zero.sh with what is left of the budget (its knobs:
#           GPUS, SYSTEMS, OFFLOAD, STEPS, TL_CONFIG, EXTRA, SMOKE -- default 0 here)
#   nvmetune   engine vs aio at NVME_THREADS; L1B tierlift on NVMe with NVME_TL_CONFIG
#   telemetry  L1B without offload, telemetry on vs off -> $OUT/telemetry_overhead.md
#   act     issue 13: L1B long context (ACT_RUNS), tierlift activations auto vs FSDP2 +/- AC -> $OUT/act.md
#   ab      this tree vs another commit's (AB_PREV, default .device/prev: `git archive OLD tierlift
#           benchmarks | tar -x -C .device/prev`, carried), L1B none/cpu, AB_REPEATS alternating
#           -> $OUT/ab_perf.md (set AB_PREV_COMMIT and TL_COMMIT in the command: no .git there)
#   moe     issue 14: Qwen3-MoE shape (benchmarks preset qwen3moe), MOE_RUNS ("system:offload ..."),
#           and the host AdamW floor over its parameter count (bench_host_adam.py) -> $OUT/moe_*.json
#   verify  L1B, optimizer on NVMe, offload.optimizer.verify on vs off (VERIFY_REPEATS, default 2,
#           alternating) -> $OUT/nvme_verify.md (benchmarks/bench_nvme_verify.py)
# TOTAL_S (default 580) bounds the whole call.  At the end every file but the *.md summaries
# goes into $OUT/session.tgz (the device returns at most 8 files; BUNDLE=0 keeps them loose).
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
    # --tb=short: no locals or arguments in failure reports (a tensor over freed memory would crash their repr)
    timeout "${TESTS_S:-150}" python3 -m pytest -q -rs -m gpu --tb=short -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1
    grep -E "^E |Fatal|FAILED|passed|failed|^tests/.*:[0-9]+: " "$OUT/gpu_tests.log" | head -40
fi
if has arena; then  # issue 4: the GPU chunk arena keeps reserved - allocated flat
    for off in ${ARENA_OFFLOAD:-none cpu}; do
        for arena in pool shared; do
            systems=tierlift
            [ "$arena" = pool ] && systems="${ARENA_PEERS:-tierlift,deepspeed}"
            echo "=== stage arena: offload $off, arena $arena, $systems ($(left) s left)"
            python3 benchmarks/bench_zero.py --gpus 1 --systems "$systems" --model l1b --steps "${ARENA_STEPS:-20}" --warmup 3 \
                --offload "$off" --timeout 150 --budget "$(( $(left) - 20 ))" --min-run-s 40 \
                --tl-config "{\"zero\": {\"arena\": \"$arena\"}}" --out "$OUT/arena_${off}_${arena}.json" \
                --logdir "/tmp/arena_logs/$off-$arena" 2>&1 | grep -E "^\[bench_zero\]" | head -6
        done
    done
    python3 benchmarks/arena_report.py "$OUT" || true
fi
if has phases; then
    echo "=== stage phases ($(left) s left)"
    timeout 150 python3 benchmarks/bench_offload_phases.py --out "$OUT/offload_phases.json" 2>&1 | tail -30
fi
if has pinned; then
    echo "=== stage pinned ($(left) s left)"
    timeout 90 python3 benchmarks/bench_pinned.py --out "$OUT/pinned.json" --sizes-mib 256,1126 --repeats 1 2>&1 | tail -12
fi
if has plan; then  # calibrate this node, then the plan's predictions for the configs measured below
    echo "=== stage plan ($(left) s left)"
    mkdir -p /tmp/tl-bench-nvme/tierlift
    timeout 90 python3 -m tierlift.launch.cli doctor --calibrate --no-disk-speed > "$OUT/doctor.txt" 2>&1
    timeout 90 python3 -m tierlift.launch.cli doctor --calibrate --nvme-path /tmp/tl-bench-nvme/tierlift \
        >> "$OUT/doctor.txt" 2>&1
    grep -E "calibration|disk" "$OUT/doctor.txt" | head -6
    for c in cpu nvme; do
        python3 -m tierlift.launch.cli plan "benchmarks/configs/l1b-offload-$c.yaml" --as-configured --json \
            > "$OUT/plan_$c.json" 2> "$OUT/plan_$c.err" || cat "$OUT/plan_$c.err"
    done
    # issue 5: the planner's own placement under a host budget equal to ZeRO-Infinity's L1B RSS
    python3 -m tierlift.launch.cli plan benchmarks/configs/l1b-offload-nvme.yaml --host-budget "${PLAN_HOST_BUDGET:-30GiB}" \
        --json > "$OUT/plan_nvme_budget.json" 2> "$OUT/plan_nvme_budget.err" || cat "$OUT/plan_nvme_budget.err"
    python3 - "$OUT" <<'PY'
import json, sys
for tag in ("cpu", "nvme", "nvme_budget"):
    try:
        d = json.load(open(f"{sys.argv[1]}/plan_{tag}.json"))
        print(f"plan {tag}: step {d['step']['step_s']:.3f} s, max_in_cpu {d['max_in_cpu']}, "
              f"pinned {d['pinned_pool_bytes'] / 2**30:.2f} GiB, rates {d['rates']['source']}")
    except Exception as exc:
        print(f"plan {tag}: {exc}")
PY
fi
if has engine; then  # issue 4's micro-benchmark with repeats: the systems alternate which goes first
    echo "=== stage engine: NVMe engine vs DeepSpeed aio, ${ENGINE_REPEATS:-5} repeats ($(left) s left)"
    timeout 240 python3 benchmarks/bench_nvme.py --dir /tmp/tl-nvme-bench --size-gib 4 --block-sizes 8 \
        --threads "${NVME_THREADS:-8}" --repeats "${ENGINE_REPEATS:-5}" --budget 220 --out "$OUT/nvme_engine.json" 2>&1 | tail -14
    rm -rf /tmp/tl-nvme-bench
fi
if has nvme; then  # issue 4 (NVMe L1B vs ZeRO-Infinity) and 5 (planned placement), one H100 session
    echo "=== stage nvme: engine vs DeepSpeed aio on this disk ($(left) s left)"
    timeout 150 python3 benchmarks/bench_nvme.py --dir /tmp/tl-nvme-bench --size-gib 4 --block-sizes 8 \
        --threads "${NVME_THREADS:-8}" --repeats 1 --budget 140 --out "$OUT/nvme_engine.json" 2>&1 | tail -4
    rm -rf /tmp/tl-nvme-bench
    echo "=== stage nvme: L1B, tierlift (optimizer on NVMe) and DeepSpeed ZeRO-Infinity ($(left) s left)"
    SMOKE=0 OFFLOAD=nvme STEPS="${NVME_STEPS:-4}" WARMUP=1 SYSTEMS="${NVME_SYSTEMS:-tierlift,deepspeed}" \
        BUDGET_S="$(( $(left) - 100 ))" OUT="$OUT" bash benchmarks/gpu_zero.sh | grep -E "^\[bench_zero\]|^\|" | head -30
    if [ -f "$OUT/plan_nvme_budget.json" ]; then
        echo "=== stage nvme: L1B with the planner's placement under the host budget ($(left) s left)"
        TLC=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'offload': {'optimizer': {'max_in_cpu': d['max_in_cpu']}}}))" "$OUT/plan_nvme_budget.json")
        python3 benchmarks/bench_zero.py --gpus 1 --systems tierlift --model l1b --steps 6 --warmup 2 --offload nvme \
            --timeout 150 --budget "$(( $(left) - 15 ))" --min-run-s 40 --tl-config "$TLC" \
            --out "$OUT/zero_planned.json" --logdir /tmp/zero_logs_planned 2>&1 | grep -E "^\[bench_zero\]|^\|" | head -8
    fi
    python3 benchmarks/nvme_report.py "$OUT" || true
fi
if has largest; then  # issue 4: largest model under a 16 GiB GPU cap and a 24 GiB host cap (cgroup v2)
    # LARGEST: "system:model[:timeout]" runs in order; each gets what is left, the report reads them all.
    for spec in ${LARGEST:-deepspeed:llama-2048-12:170 deepspeed:llama-1536-12:170 tierlift:llama-2560-24:260}; do
        IFS=: read -r sys model tmo <<< "$spec"
        echo "=== stage largest: $sys $model ($(left) s left)"
        extra=()
        [ "$sys" = tierlift ] && extra=(--tl-config '{"offload": {"grad_backlog_bytes": 2147483648}}')
        python3 benchmarks/bench_zero.py --gpus 1 --systems "$sys" --model "$model" --steps 3 --warmup 1 \
            --offload nvme --gpu-mem-gib 16 --host-cap-gib 24 --timeout "${tmo:-240}" --budget "$(( $(left) - 10 ))" \
            --min-run-s 60 "${extra[@]}" --out "$OUT/largest_${sys}_${model}.json" --logdir "/tmp/largest_logs/$sys-$model" \
            2>&1 | grep -E "^\[bench_zero\]" | head -6
    done
    python3 benchmarks/largest_report.py "$OUT" || true
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
if has nvmetune; then  # tierlift alone on NVMe with other engine settings (NVME_TL_CONFIG), plus the disk rates
    echo "=== stage nvmetune: engine vs DeepSpeed aio ($(left) s left)"
    timeout 120 python3 benchmarks/bench_nvme.py --dir /tmp/tl-nvme-bench --size-gib 4 --block-sizes 8 \
        --threads "${NVME_THREADS:-4,8}" --repeats 1 --budget 100 --out "$OUT/nvme_engine.json" 2>&1 | tail -6
    rm -rf /tmp/tl-nvme-bench
    echo "=== stage nvmetune: L1B tierlift, optimizer on NVMe, ${NVME_TL_CONFIG:-defaults} ($(left) s left)"
    python3 benchmarks/bench_zero.py --gpus 1 --systems tierlift --model l1b --steps 5 --warmup 1 --offload nvme \
        --timeout 150 --budget "$(( $(left) - 10 ))" --min-run-s 60 ${NVME_TL_CONFIG:+--tl-config "$NVME_TL_CONFIG"} \
        --out "$OUT/zero_nvmetune.json" --logdir /tmp/zero_logs_nvmetune 2>&1 | grep -E "^\[bench_zero\] tierlift" | head -3
    python3 - "$OUT" <<'PY' || true
import json, sys
r = next(r for r in json.load(open(f"{sys.argv[1]}/zero_nvmetune.json"))["runs"] if r["status"] == "ok")
print("nvmetune steps", [round(x, 2) for x in r["step_times_s"]], "busy", r.get("tierlift_summary", {}).get("offload_busy_s"))
PY
fi
if has telemetry; then  # issue 5: the sampler's cost, L1B without offload, telemetry on vs off, same run dir writers
    for tele in true false; do
        echo "=== stage telemetry: enabled=$tele ($(left) s left)"
        python3 benchmarks/bench_zero.py --gpus 1 --systems tierlift --model l1b --steps 14 --warmup 4 --offload none \
            --timeout 200 --budget "$(( $(left) - 10 ))" --min-run-s 60 --tl-config "{\"telemetry\": {\"enabled\": $tele}}" \
            --tl-run-dir "/tmp/tl-tele-$tele" --out "$OUT/telemetry_$tele.json" --logdir "/tmp/tele_logs_$tele" \
            2>&1 | grep -E "^\[bench_zero\] tierlift" | head -3
        ls /tmp/tl-tele-$tele/telemetry 2>/dev/null | head -3
        rm -rf "/tmp/tl-tele-$tele/checkpoints"
    done
    python3 - "$OUT" <<'PY' | tee "$OUT/telemetry_overhead.md"
import json, sys
def run(tag):
    d = json.load(open(f"{sys.argv[1]}/telemetry_{tag}.json"))
    return next(r for r in d["runs"] if r["status"] == "ok")
on, off = run("true"), run("false")
ratio = on["step_s"] / off["step_s"]
print("# Telemetry overhead, L1B ZeRO-3 without offload, one H100, one session\n")
print(f"- telemetry on: {on['step_s']:.4f} s/step (median of {len(on['step_times_s']) - 4} timed steps); "
      f"off: {off['step_s']:.4f} s/step; overhead {ratio - 1:+.2%} (target <= 1%: {'met' if ratio - 1 <= 0.01 else 'NOT met'})")
print(f"- per-step times on:  {[round(x, 4) for x in on['step_times_s']]}")
print(f"- per-step times off: {[round(x, 4) for x in off['step_times_s']]}")
PY
fi
if has act; then  # issue 13: long context, tierlift's activation plan vs FSDP2 (+/- checkpointing)
    # ACT_RUNS: "system:mode:capGiB:seq" with mode auto (tierlift), ac (checkpoint every block), noac (keep)
    for spec in ${ACT_RUNS:-tierlift:auto:0:32768 fsdp2:ac:0:32768 fsdp2:noac:0:32768}; do
        IFS=: read -r sys mode cap seq <<< "$spec"
        extra=()
        [ "$mode" != ac ] && extra+=(--no-ac)
        [ "$mode" = auto ] && extra+=(--tl-config '{"train": {"activations": {"policy": "auto"}}}')
        [ "$cap" != 0 ] && extra+=(--gpu-mem-gib "$cap")
        echo "=== stage act: $sys $mode cap=$cap seq=$seq ($(left) s left)"
        # Every system gets the allocator setting tierlift's launcher gives its ranks (fair).
        PYTORCH_CUDA_ALLOC_CONF="${ACT_ALLOC_CONF:-expandable_segments:True}" \
        python3 benchmarks/bench_zero.py --gpus 1 --systems "$sys" --model l1b --steps "${ACT_STEPS:-6}" --warmup 2 \
            --mbs 1 --seq "$seq" --timeout 200 --budget "$(( $(left) - 20 ))" --min-run-s 50 "${extra[@]}" \
            --out "$OUT/act_${sys}_${mode}_${cap}_${seq}.json" --logdir "/tmp/act_logs/$sys-$mode-$cap-$seq" \
            2>&1 | grep -E "^\[bench_zero\] ($sys|skip)" | head -3
    done
    python3 benchmarks/act_report.py "$OUT" || true
fi
if has ab; then  # issue 11: this tree vs AB_PREV (another commit's tierlift/ and benchmarks/), L1B, alternating
    prev="$PWD/${AB_PREV:-.device/prev}"
    [ -d "$prev/tierlift" ] || echo "ab: no tree at $prev (carry it)"
    # A discarded first run: the first L1B process on a fresh machine ran 1.4-1.5x slower than
    # every later one (H200, 2026-12-04: 0.636 s vs 0.419-0.457 s for five trees in a row), which
    # once read as a 1.39x regression of whichever tree went first.
    echo "=== stage ab: warm-up run, discarded ($(left) s left)"
    python3 benchmarks/bench_zero.py --gpus 1 --systems tierlift --model l1b --steps 4 --warmup 1 --offload cpu \
        --timeout 120 --budget "$(( $(left) - 20 ))" --min-run-s 30 --out /tmp/ab_warmup.json \
        --logdir /tmp/ab_logs/warmup 2>&1 | grep -E "^\[bench_zero\] (tierlift|skip)" | head -2
    for rep in $(seq 1 "${AB_REPEATS:-2}"); do
        for off in ${AB_OFFLOAD:-none cpu}; do
            trees="new prev"; [ $(( rep % 2 )) = 0 ] && trees="prev new"
            for t in $trees; do
                root="$PWD"; [ "$t" = prev ] && root="$prev"
                echo "=== stage ab: $t, offload $off, repeat $rep ($(left) s left)"
                # the root first on PYTHONPATH: that tree's tierlift is the one imported by its worker
                PYTHONPATH="$root:$PYTHONPATH" python3 "$root/benchmarks/bench_zero.py" --gpus 1 --systems tierlift \
                    --model l1b --steps "${AB_STEPS:-10}" --warmup 3 --offload "$off" --timeout 150 \
                    --budget "$(( $(left) - 20 ))" --min-run-s 40 --out "$OUT/ab_${t}_${off}_r${rep}.json" \
                    --logdir "/tmp/ab_logs/$t-$off-$rep" 2>&1 | grep -E "^\[bench_zero\] (tierlift|skip)" | head -3
            done
        done
    done
    python3 benchmarks/ab_report.py "$OUT" || true
fi
if has moe; then  # issue 14: Qwen3-MoE shape, params + optimizer on CPU, tierlift vs DeepSpeed ZeRO-3, and
    # tierlift without offload; the host-step floor (torch's fused CPU AdamW over the same parameter count)
    for spec in ${MOE_RUNS:-tierlift:cpu deepspeed:cpu tierlift:none}; do
        IFS=: read -r sys off <<< "$spec"
        echo "=== stage moe: $sys offload $off ($(left) s left)"
        python3 benchmarks/bench_zero.py --gpus 1 --systems "$sys" --model qwen3moe --steps "${MOE_STEPS:-6}" --warmup 2 \
            --offload "$off" --timeout 240 --budget "$(( $(left) - 20 ))" --min-run-s 60 \
            --out "$OUT/moe_${sys}_${off}.json" --logdir "/tmp/moe_logs/$sys-$off" 2>&1 | grep -E "^\[bench_zero\] ($sys|skip)" | head -3
    done
    if [ -f benchmarks/bench_host_adam.py ]; then
        echo "=== stage moe: host AdamW floor, 2.61e9 params ($(left) s left)"
        timeout 200 python3 benchmarks/bench_host_adam.py --params 2616514048 --out "$OUT/moe_host_adam.json" 2>&1 | tail -6
    fi
fi
if has verify; then  # issue 17: the cost of checking NVMe reads against their crc32, one session, side by side
    echo "=== stage verify: L1B on NVMe, verification on vs off ($(left) s left)"
    python3 benchmarks/bench_nvme_verify.py --out "$OUT/nvme_verify.json" --repeats "${VERIFY_REPEATS:-2}" \
        --steps "${VERIFY_STEPS:-6}" --warmup 2 --budget "$(( $(left) - 15 ))" --logdir /tmp/verify_logs \
        2>&1 | grep -E "^\[verify|^\*\*|^\|" | head -20
fi
# The device returns at most 8 files: everything goes into one archive, the summaries stay beside it.
if [ "${BUNDLE:-1}" = 1 ]; then
    mkdir -p /tmp/session_all && find "$OUT" -maxdepth 1 -type f ! -name '*.md' ! -name 'session.tgz' \
        -exec mv {} /tmp/session_all/ \;
    tar czf "$OUT/session.tgz" -C /tmp/session_all . && ls "$OUT"
fi
echo "=== session done in $(( SECONDS - T0 )) s"
