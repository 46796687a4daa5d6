#!/usr/bin/env bash
# The whole first look on the lent GPU machine (the shared GPU.md) in ONE call of at most
# 7 minutes: stage limits add up to at most BUDGET = 420 s, and each stage writes its results
# under $OUT as it goes, so a call cut short still returns everything finished before.
# From the repository root, with the wheels of scripts/gpu_wheels.sh carried in .whl/:
#
#   GIT_COMMIT=<hash> bash benchmarks/gpu_check.sh
#
# Stages, in order (limit in s; T_<STAGE>=N overrides one; STAGES="..." runs a subset):
#   install    20  the carried wheels (--target /tmp/site, no network) and the project with
#                  pip --no-deps --no-build-isolation -e ., first building the managed-memory
#                  helper (QLORA_TRITON_BUILD_CUDA=1, nvcc), without it if that fails
#   env        10  GPU, driver, torch, triton, transformers, bitsandbytes versions
#   tests     125  pytest -m gpu (compiled Triton), -rA, a per-test timeout; stopped with SIGINT
#                  at the limit, so the log still ends with pytest's summary of what ran
#   bench      70  the core table: qlora_triton vs bitsandbytes vs bf16 cuBLAS, matmul_fwd at
#                  M = 1, 16, 4096 on 4096x4096, 8192x8192, 28672x8192; LoRALinear4bit fwd+bwd vs
#                  bitsandbytes + a PEFT-style adapter (M = 2048); PagedAdamW vs torch fused AdamW;
#                  each qlora_triton decode row with the static sm_90 estimate of its config beside it
#                  (bench/rows.jsonl, the rows as they come, is removed once results.json holds them)
#   diag       40  python -m benchmarks.gpu_diag --parts managed,lora,step,split (new first): host time per call
#                  against GPU time by CUDA-graph replay at M = 1 and 16, every provider; the paged
#                  states' accounting (the core table's do_bench at small M times the host); the LoRA
#                  layer's fwd+bwd at M = 2048 and a 2-layer 7B-wide training step (QLoRA, 16-bit
#                  LoRA), host or wall time against GPU-busy time (torch.profiler)
#   preset     55  qlora-triton finetune --preset 7b --steps 4 --lora16 (then the 16-bit LoRA baseline:
#                  PEFT on dense bf16 weights, the same shape, tokens and steps)
#   crossover  25  python -m benchmarks.crossover (fused vs dequant; the JSON grows row by row)
#   decode     75  python -m benchmarks.bench_decode: eager rows for every provider, then compiled
#                  (CUDA graphs through torch.compile "reduce-overhead")
# and a short table last (the bench rows, then one line per stage).
#
# $OUT (at most 8 files come back): log.txt (every stage's output but pytest's, and the
# summary), pytest.log, bench/results.json and bench/results.md (bench/rows.jsonl instead while
# the bench stage is cut short), diag.jsonl, preset/preset-7b.json, crossover.json, decode.jsonl. The exit status is non-zero when a stage failed or ran out of time.
#
# DRY_RUN=1 (CI, tests/test_gpu_check.py): on the CPU, no installs; checks that the stage limits
# add up to at most BUDGET, that every import the GPU run makes is on the machine or in the
# wheels (python -m benchmarks.gpu_machine --check), lists the wheels, and runs each stage in
# its CPU form: pytest -m gpu --collect-only, the bench --smoke, the tiny preset on the CPU,
# the crossover --smoke, the decode --smoke, each under SCALE (10) x its limit (diag: GPU only).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu_check}
BUDGET=420
ORDER=(install env tests bench diag preset crossover decode)
declare -A LIMIT=([install]=20 [env]=10 [tests]=125 [bench]=70 [diag]=40 [preset]=55 [crossover]=25 [decode]=75)
for s in "${ORDER[@]}"; do v="T_${s^^}"; LIMIT[$s]=${!v:-${LIMIT[$s]}}; done
STAGES=${STAGES:-${ORDER[*]}}
# The dry run's stages interpret on a shared 2-core CPU: their time limits are SCALE x the GPU's.
if [ "$DRY_RUN" = 1 ]; then SCALE=${SCALE:-10}; else SCALE=1; fi
BENCH_SELECT=(--ops matmul_fwd,lora_fwd_bwd,optimizer_step --providers qlora_triton,bitsandbytes,bf16)
BENCH_SIZES=(--shapes 4096x4096,8192x8192,28672x8192 --m 1,16,4096,2048 --warmup-ms 5 --rep-ms 25)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET   # compiled Triton on the GPU; the CPU dry run takes the torch backend
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
record() { SUMMARY+=("$(printf '%-9s %-14s %5s s  %s' "$1" "$2" "$3" "$4")"); }
status() {  # RC LIMIT -> ok | FAIL rc=N | TIMEOUT Ns
  case "$1" in 0) echo ok ;; 124|137|130) echo "TIMEOUT ${2}s" ;; *) echo "FAIL rc=$1" ;; esac
}
# run_for STAGE CMD...: CMD under what is left of STAGE's limit, output appended to log.txt
run_for() {
  local stage=$1; shift
  local left=$((DEADLINE - SECONDS))
  (( left < 1 )) && return 124
  echo "\$ $*" >>"$LOG"
  timeout -s INT -k 5 "$left" "$@" >>"$LOG" 2>&1
}

total=0
for s in "${ORDER[@]}"; do total=$((total + LIMIT[$s])); done
log "== gpu_check $(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown}, DRY_RUN=$DRY_RUN, stages: $STAGES"
log "stage limits: $(for s in "${ORDER[@]}"; do printf '%s %ss, ' "$s" "${LIMIT[$s]}"; done)total ${total} s of ${BUDGET} s" \
  "$([ "$SCALE" = 1 ] || echo "(x$SCALE in this dry run)")"
if (( total > BUDGET )); then
  log "the stage limits add up to ${total} s, over the ${BUDGET} s budget"
  exit 2
fi
log "wheels to carry (.whl/, bash scripts/gpu_wheels.sh): $("$PY" -m benchmarks.gpu_machine --wheels | tr '\n' ' ')"

for stage in "${ORDER[@]}"; do
  wants "$stage" || [ "$stage" = env ] || continue
  DEADLINE=$((SECONDS + LIMIT[$stage] * SCALE))
  t0=$SECONDS; rc=0; note=""
  log "== $stage (limit ${LIMIT[$stage]} s)"
  case "$stage" in
    install)
      if [ "$DRY_RUN" = 1 ]; then
        wheel_dir=(); compgen -G ".whl/*.whl" >/dev/null && wheel_dir=(--wheel-dir .whl)
        run_for install "$PY" -m benchmarks.gpu_machine --check "${wheel_dir[@]}" || rc=$?
        note="dry run: import check $([ $rc = 0 ] && echo passed || echo FAILED), nothing installed"
      else
        if compgen -G ".whl/*.whl" >/dev/null; then
          run_for install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { rc=$?; note="wheels FAILED; "; }
          export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        else
          note="no .whl/ carried (bitsandbytes rows: not installed); "
        fi
        if QLORA_TRITON_BUILD_CUDA=1 run_for install "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
          note+="managed-memory helper built"
        else
          log "QLORA_TRITON_BUILD_CUDA=1 install failed; installing without the helper (paged=False fallback)"
          if run_for install "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
            note+="helper build FAILED (see log.txt), installed without it"
          else rc=$?; note+="project install FAILED"; fi
        fi
      fi ;;
    env)
      command -v nvidia-smi >/dev/null && run_for env nvidia-smi \
        --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
      run_for env "$PY" -c '
import importlib.metadata as md, platform, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"gpu {gpu} | python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
for dist in ("transformers", "accelerate", "peft", "bitsandbytes", "qlora_triton"):
    try: print(dist, md.version(dist))
    except md.PackageNotFoundError: print(dist, "not installed")' || rc=$?
      note=$(grep -m1 '^gpu [^=]' "$LOG" | cut -c1-100) ;;
    tests)
      if [ "$DRY_RUN" = 1 ]; then args=(--collect-only -q); else args=(-rA --timeout 60 ${PYTEST_ARGS:-}); fi
      timeout -s INT -k 5 $((LIMIT[tests] * SCALE)) "$PY" -m pytest -p no:cacheprovider -m gpu "${args[@]}" tests \
        >"$OUT/pytest.log" 2>&1 || rc=$?
      [ "$DRY_RUN" = 1 ] && [ "$rc" = 5 ] && rc=0   # no gpu-marked test collected on the CPU
      note=$(grep -E '(passed|failed|error|selected|no tests ran)' "$OUT/pytest.log" | tail -1 | tr -d '=' | xargs | cut -c1-100) ;;
    bench)
      if [ "$DRY_RUN" = 1 ]; then sizes=(--smoke); else sizes=("${BENCH_SIZES[@]}"); fi
      # shellcheck disable=SC2206  # BENCH_ARGS is a list of options that replaces the selection
      select=(${BENCH_ARGS:-${BENCH_SELECT[*]}})
      run_for bench "$PY" -m benchmarks --out "$OUT/bench" --no-plots --no-progress "${sizes[@]}" "${select[@]}" \
        ${GIT_COMMIT:+--git-commit "$GIT_COMMIT"} || rc=$?
      if [ "$rc" = 0 ] && [ -f "$OUT/bench/results.json" ]; then
        rm -f "$OUT/bench/rows.jsonl"  # results.json holds every row; the call returns 8 files at most
        note="$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["results"]))' \
          "$OUT/bench/results.json") rows in bench/results.json"
      else
        note="$(cat "$OUT/bench/rows.jsonl" 2>/dev/null | wc -l) rows in bench/rows.jsonl"
      fi ;;
    diag)
      if [ "$DRY_RUN" = 1 ]; then
        note="GPU only: not run in the dry run"
      else
        run_for diag "$PY" -m benchmarks.gpu_diag --parts managed,lora,step,split --out "$OUT/diag.jsonl" || rc=$?
        note="$(grep -c '"graph_us"\|"busy_us"' "$OUT/diag.jsonl" 2>/dev/null || echo 0) rows with GPU time in diag.jsonl"
      fi ;;
    preset)
      if [ "$DRY_RUN" = 1 ]; then preset=(--preset tiny --device cpu --steps 2); else preset=(--preset 7b --steps 4); fi
      run_for preset "$PY" -m qlora_triton.cli finetune "${preset[@]}" --lora16 --output-dir "$OUT/preset" || rc=$?
      note="$("$PY" - "$OUT/preset" <<'EOF' 2>/dev/null | cut -c1-110
import glob, json, sys
d = json.load(open(glob.glob(sys.argv[1] + "/preset-*.json")[0]))
b = d.get("lora16")
base = ("not run" if b is None else b["skipped"] if "skipped" in b else
        "step %.0f ms" % (b["step_seconds_median"] * 1e3) + (", peak %.2f GiB" % (b["memory"]["delta_bytes"] / 2**30)
                                                           if b["memory"]["kind"].startswith("cuda") else ""))
print("QLoRA step %.0f ms, peak %.2f GiB; 16-bit LoRA %s"
      % (d["step_seconds_median"] * 1e3, d["memory"]["peak_bytes"] / 2**30, base))
EOF
)" ;;
    crossover)
      smoke=(); [ "$DRY_RUN" = 1 ] && smoke=(--smoke)
      run_for crossover "$PY" -m benchmarks.crossover "${smoke[@]}" --out "$OUT/crossover.json" || rc=$?
      note="$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["rows"]), "rows, complete" if d["complete"] else "rows, cut short", [(c["bucket"], c["dtype"], c["dequant_from_m"]) for c in d["crossover"]])' "$OUT/crossover.json" 2>/dev/null | cut -c1-100)" ;;
    decode)
      if [ "$DRY_RUN" = 1 ]; then dec=(--smoke --providers qlora_triton --layers 1 --new-tokens 3); else dec=(); fi
      run_for decode "$PY" -m benchmarks.bench_decode "${dec[@]}" --modes eager --out "$OUT/decode.jsonl" || rc=$?
      [ "$rc" = 0 ] && { run_for decode "$PY" -m benchmarks.bench_decode "${dec[@]}" --modes compiled \
        --out "$OUT/decode.jsonl" || rc=$?; }
      note="$(grep -c '"status": "ok"' "$OUT/decode.jsonl" 2>/dev/null || echo 0) ok rows in decode.jsonl" ;;
  esac
  record "$stage" "$(status "$rc" "${LIMIT[$stage]}")" $((SECONDS - t0)) "$note"
done

# -- the short table, last -------------------------------------------------------------------
{
  echo "== summary"
  "$PY" - "$OUT/bench" <<'EOF' 2>/dev/null
import json, pathlib, sys
bench = pathlib.Path(sys.argv[1])
done = bench / "results.json"
rows = json.loads(done.read_text())["results"] if done.exists() else [
    json.loads(line) for line in (bench / "rows.jsonl").read_text().splitlines()]
print(f"{'op':15s} {'shape':17s} {'M':>5s} {'provider':13s} {'ms':>9s} {'x_floor':>7s}  static est. (x floor)")
for r in rows:
    est = r.get("sass_estimate") or {}
    ms = f"{r['ms']:.4f}" if r.get("ms") is not None else r.get("status", "")[:9]
    xf = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
    print(f"{r['op']:15s} {r['shape']:17s} {str(r['m'] or '-'):>5s} {r['provider']:13s} {ms:>9s} {xf:>7s}  "
          f"{est.get('bound_over_floor', '-')}")
EOF
  echo "gpu_check: $(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown}, $SECONDS s of a ${BUDGET} s budget"
  printf '%-9s %-14s %7s  %s\n' stage status time note
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
! printf '%s\n' "${SUMMARY[@]}" | grep -q ' FAIL\| TIMEOUT'
