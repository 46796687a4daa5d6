#!/usr/bin/env bash
# The README's main command: makes (or reuses) .venv like scripts/test.sh,
# installs the package with its fine-tuning extras, and runs
# `qlora-triton finetune` with any arguments passed through
# (bash scripts/demo.sh --steps 40, bash scripts/demo.sh --preset tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# A CPU build of torch, pinned, when there is no CUDA GPU (an unpinned torch
# pulls a multi-GB CUDA build); on a GPU machine an existing CUDA torch stays.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || "$PY" -m pip install -q torch
else
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[finetune]"
exec "$VENV/bin/qlora-triton" finetune "$@"
