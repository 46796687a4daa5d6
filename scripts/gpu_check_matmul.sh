#!/usr/bin/env bash
# The whole GPU check of the fused NF4 matmul in one call (see ../shared/GPU.md):
# install, run tests/test_matmul.py on CUDA (compiled Triton), run the full
# benchmark, write logs + JSON under $OUT, print the table last.
# Carry bitsandbytes as wheels in .whl/ to get its provider (GPU.md shows how).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_matmul}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x tests/test_matmul.py >"$OUT/test_matmul.log" 2>&1
echo "tests/test_matmul.py exit $?: $(tail -1 "$OUT/test_matmul.log")"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_matmul.py --json "$OUT/bench_matmul.json" \
    >"$OUT/bench_matmul.txt" 2>"$OUT/bench_matmul.err"
echo "bench_matmul exit $?"
cat "$OUT/bench_matmul.txt"
