#!/usr/bin/env bash
# The whole GPU check of the paged optimizers in one call (device machine):
# build the managed-memory helper, run the optimizer tests on CUDA (the GPU-marked
# paging tests included), benchmark against torch.optim.AdamW(fused=True) (and
# bitsandbytes when its wheel is carried in .whl/), write logs + JSON to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
QLORA_TRITON_BUILD_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q tests/test_paged.py tests/test_optim.py tests/test_bench_optimizer.py -x -rs \
  > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"; tail -15 "$OUT/pytest.log"
timeout 200 python3 benchmarks/bench_optimizer.py --json "$OUT/bench_optimizer.json" 2>&1 | tee "$OUT/bench.log"
