#!/usr/bin/env bash
# The README's main command: makes (or reuses) .venv like scripts/test.sh,
# installs the package with its fine-tuning extras, and runs
# `qlora-triton finetune` with any arguments passed through
# (bash scripts/demo.sh --steps 40, bash scripts/demo.sh --preset tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: with another job on a 2-core
# machine, torch CPU training ran 13x faster (measured 2026-11-29).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
# torch 2.13.0, pinned, when there is no CUDA GPU (a CPU build on local disk on the
# development machines; an unpinned torch pulls a multi-GB CUDA build); on a GPU
# machine the venv sees the system's packages, so an installed CUDA torch (and
# Triton) is used as it is.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    [ -x "$PY" ] || python3 -m venv --system-site-packages "$VENV"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || "$PY" -m pip install -q torch
else
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[finetune]"
exec "$VENV/bin/qlora-triton" finetune "$@"
