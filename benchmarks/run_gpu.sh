#!/usr/bin/env bash
# The full benchmark run on the GPU machine, as one command from the repository root:
#
#   GIT_COMMIT=<hash of the tree> bash benchmarks/run_gpu.sh [options of python -m benchmarks]
#
# Installs the carried wheels (.whl/: bitsandbytes 0.50.2 and torchao, see the shared GPU.md) and
# the project (with the CUDA managed-memory helper when nvcc builds it), prints the card's state,
# then runs the whole suite. Results go to $OUT/<gpu>-<date>/ when $OUT is set (the device tool's
# folder that comes back), else to benchmarks/results/<gpu>-<date>/; the log beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
QLORA_TRITON_BUILD_CUDA=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv || true
root=${OUT:-benchmarks/results}
mkdir -p "$root"
"$PY" -m benchmarks --results-root "$root" ${GIT_COMMIT:+--git-commit "$GIT_COMMIT"} "$@" 2>&1 \
  | tee "$root/bench.log"
exit "${PIPESTATUS[0]}"
