#!/usr/bin/env bash
# The whole GPU check in one call of the lent GPU machine (see the shared GPU.md), run from the
# repository root with the wheels of bitsandbytes 0.50.2 and torchao carried in .whl/:
#
#   GIT_COMMIT=<hash> bash benchmarks/gpu_check.sh
#
# Stages, in this order, each under its own `timeout` and all under one overall budget (a stage
# gets min(its own limit, what is left of the budget), and is skipped with under MIN_STAGE s left):
#   install  the carried wheels (--target /tmp/site) and the project, first with
#            QLORA_TRITON_BUILD_CUDA=1 (the paged optimizers' managed-memory helper, nvcc), then,
#            if that fails, without it (recorded in the summary)
#   env      GPU, driver, CUDA, torch, triton, bitsandbytes, torchao versions (always runs)
#   tests    the whole pytest suite on CUDA, compiled Triton (TRITON_INTERPRET unset)
#   presets  `qlora-triton finetune --preset 7b` and `--preset 65b` (when the CLI has --preset)
#   crossover  `python -m benchmarks.crossover`: fused vs dequant timed at growing M, the measured
#            strategy crossover table (crossover.json; load it with
#            qlora_triton.strategy.load_crossover or QLORA_TRITON_CROSSOVER=crossover.json)
#   bench    the full benchmark suite (python -m benchmarks); last, because it can be resumed:
#            with $RESUME present (default .bench_resume/rows.jsonl) it passes --resume
# and a short summary table is printed last.
#
# $OUT gets at most 8 plain files, no folders (the device tool returns no more):
#   setup.log  pytest.log  presets.log  bench.log  summary.txt  crossover.json
#   bench_results.tar.gz   the results folder <gpu>-<date>/ (results.json, results.md, plots,
#                          rows.jsonl): `tar -xzf bench_results.tar.gz -C benchmarks/results`
#   rows.jsonl             the bench rows measured so far, for a rerun that finishes the bench:
#                          copy it to .bench_resume/rows.jsonl and call again with
#                          STAGES="install bench", carry [".whl", ".bench_resume"]
#
# Settings (environment): OUT (default /tmp/gpu_check), GIT_COMMIT (the tree there has no .git),
# PYTHON (python3), STAGES ("install tests presets crossover bench"), BUDGET (480 s in all),
# T_INSTALL (120), T_TESTS (180), T_PRESET (60 each), T_CROSSOVER (90), T_BENCH (400), MIN_STAGE (20), PRESETS ("7b 65b"),
# BENCH_ARGS (extra options of python -m benchmarks), PYTEST_ARGS, RESUME.
#
# DRY_RUN=1: the same script on a CPU machine, to check it: no installs, pytest --collect-only,
# the bench with --smoke, the presets on the CPU (PRESETS defaults to "tiny").
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)   # outside $OUT: only the flat files below go back
STAGES=${STAGES:-install tests presets crossover bench}
BUDGET=${BUDGET:-480}
MIN_STAGE=${MIN_STAGE:-20}
RESUME=${RESUME:-.bench_resume/rows.jsonl}
if [ "$DRY_RUN" = 1 ]; then PRESETS=${PRESETS:-tiny}; else PRESETS=${PRESETS:-7b 65b}; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET   # compiled Triton on the GPU; the CPU dry run uses the torch backend
START=$SECONDS
SUMMARY=()

wants() { [[ " $STAGES " == *" $1 "* ]]; }
# record STAGE STATUS SECONDS NOTE
record() { SUMMARY+=("$(printf '%-9s %-14s %5s s  %s' "$1" "$2" "$3" "$4")"); }
# limit STAGE_LIMIT: min(stage limit, budget left); prints 0 when under MIN_STAGE s are left
limit() {
  local left=$((BUDGET - (SECONDS - START)))
  local t=$(( $1 < left ? $1 : left ))
  (( t < MIN_STAGE )) && t=0
  echo "$t"
}
# status RC LIMIT -> ok | FAIL rc=N | TIMEOUT Ns
status() {
  case "$1" in
    0) echo ok ;;
    124|137) echo "TIMEOUT ${2}s" ;;
    *) echo "FAIL rc=$1" ;;
  esac
}

# -- install -------------------------------------------------------------------------------
: >"$OUT/setup.log"
if wants install; then
  t0=$SECONDS; t=$(limit "${T_INSTALL:-120}"); note=""
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY_RUN: would install .whl/*.whl into /tmp/site and the project (QLORA_TRITON_BUILD_CUDA=1)" \
      | tee -a "$OUT/setup.log"
    rc=0; note="dry run: nothing installed"
  else
    rc=0
    if compgen -G ".whl/*.whl" >/dev/null; then
      timeout -k 5 "$t" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$OUT/setup.log" 2>&1 || { rc=$?; note="wheels failed; "; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      note="no .whl/ carried (bitsandbytes, torchao: not installed); "
    fi
    t=$(limit "${T_INSTALL:-120}")
    if QLORA_TRITON_BUILD_CUDA=1 timeout -k 5 "$t" "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        >>"$OUT/setup.log" 2>&1; then
      note+="managed-memory helper built"
    else
      echo "QLORA_TRITON_BUILD_CUDA=1 install failed; installing without the helper" >>"$OUT/setup.log"
      t=$(limit "${T_INSTALL:-120}")
      if timeout -k 5 "$t" "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1
      then note+="helper build FAILED (see setup.log), installed without it"
      else rc=$?; note+="project install FAILED"
      fi
    fi
  fi
  record install "$(status "$rc" "$t")" $((SECONDS - t0)) "$note"
fi

# -- env -----------------------------------------------------------------------------------
{
  echo "== $(date -u +%FT%TZ)  commit ${GIT_COMMIT:-unknown}  DRY_RUN=$DRY_RUN"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"gpu {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
for dist in ("bitsandbytes", "torchao", "qlora_triton"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} | tee -a "$OUT/setup.log"
record env ok 0 "$(grep -m1 '^gpu ' "$OUT/setup.log" | cut -c1-90)"

# -- tests ---------------------------------------------------------------------------------
if wants tests; then
  t0=$SECONDS; t=$(limit "${T_TESTS:-180}")
  if [ "$t" = 0 ]; then record tests "skipped" 0 "no budget left"
  else
    if [ "$DRY_RUN" = 1 ]; then args=(--collect-only -q); else args=(-q -rfEs --durations=15 ${PYTEST_ARGS:-}); fi
    timeout -k 10 "$t" "$PY" -m pytest -p no:cacheprovider "${args[@]}" tests >"$OUT/pytest.log" 2>&1
    rc=$?
    record tests "$(status "$rc" "$t")" $((SECONDS - t0)) "$(grep -v '^\s*$' "$OUT/pytest.log" | tail -1 | cut -c1-90)"
  fi
fi

# -- presets -------------------------------------------------------------------------------
if wants presets; then
  : >"$OUT/presets.log"
  if ! "$PY" -m qlora_triton.cli finetune --help 2>/dev/null | grep -q -- '--preset'; then
    record presets "skipped" 0 "qlora-triton finetune has no --preset here"
  else
    for preset in $PRESETS; do
      t0=$SECONDS; t=$(limit "${T_PRESET:-60}")
      if [ "$t" = 0 ]; then record "$preset" "skipped" 0 "no budget left"; continue; fi
      device=(); [ "$DRY_RUN" = 1 ] && device=(--device cpu)
      timeout -k 10 "$t" "$PY" -m qlora_triton.cli finetune --preset "$preset" "${device[@]}" \
        --output-dir "$WORK/presets" >"$WORK/preset.log" 2>&1
      rc=$?
      { echo "== qlora-triton finetune --preset $preset ${device[*]}: rc $rc"; cat "$WORK/preset.log"
        cat "$WORK/presets/preset-$preset.json" 2>/dev/null; echo; } >>"$OUT/presets.log"
      note=$(grep -m1 "^preset $preset" "$WORK/preset.log" || grep -v '^\s*$' "$WORK/preset.log" | tail -1)
      record "$preset" "$(status "$rc" "$t")" $((SECONDS - t0)) "$(cut -c1-90 <<<"$note")"
    done
  fi
fi

# -- crossover -----------------------------------------------------------------------------
if wants crossover; then
  t0=$SECONDS; t=$(limit "${T_CROSSOVER:-90}")
  if [ "$t" = 0 ]; then
    record crossover "skipped" 0 "no budget left"
  else
    smoke=(); [ "$DRY_RUN" = 1 ] && smoke=(--smoke)
    timeout -k 10 "$t" "$PY" -m benchmarks.crossover "${smoke[@]}" --out "$OUT/crossover.json" \
      >"$WORK/crossover.log" 2>&1
    rc=$?
    record crossover "$(status "$rc" "$t")" $((SECONDS - t0)) \
      "$(grep -m2 'dequant' "$WORK/crossover.log" | tr '\n' ';' | cut -c1-90)"
  fi
fi

# -- bench ---------------------------------------------------------------------------------
if wants bench; then
  t0=$SECONDS; t=$(limit "${T_BENCH:-400}")
  if [ "$t" = 0 ]; then record bench "skipped" 0 "no budget left"
  else
    args=(--results-root "$WORK/results" --no-progress ${GIT_COMMIT:+--git-commit "$GIT_COMMIT"})
    [ "$DRY_RUN" = 1 ] && args+=(--smoke)
    [ -s "$RESUME" ] && args+=(--resume "$RESUME")
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout -k 10 "$t" "$PY" -m benchmarks "${args[@]}" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
    rc=$?
    rows=$(find "$WORK/results" -name rows.jsonl 2>/dev/null | head -1)
    if [ -n "$rows" ]; then
      cp "$rows" "$OUT/rows.jsonl"
      tar -C "$WORK/results" -czf "$OUT/bench_results.tar.gz" .
    fi
    n=$( [ -n "$rows" ] && wc -l <"$rows" || echo 0 )
    note="$n rows${rows:+ (rows.jsonl, bench_results.tar.gz)}"
    [ -s "$RESUME" ] && note+="; resumed from $RESUME"
    (( rc == 124 || rc == 137 )) && note+="; rerun with STAGES=\"install bench\" to finish"
    record bench "$(status "$rc" "$t")" $((SECONDS - t0)) "$note"
  fi
fi

# -- summary (last) ------------------------------------------------------------------------
{
  if [ -f "$OUT/bench.log" ]; then sed -n '/^summary (geometric-mean/,/^$/p' "$OUT/bench.log"; echo; fi
  echo "gpu_check: $(date -u +%FT%TZ), commit ${GIT_COMMIT:-unknown}, $((SECONDS - START)) s of a ${BUDGET} s budget"
  printf '%-9s %-14s %7s  %s\n' stage status time note
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
# the exit status says whether every stage that ran passed
! printf '%s\n' "${SUMMARY[@]}" | grep -q ' FAIL\| TIMEOUT'
