#!/usr/bin/env bash
# The test command of the README: makes (or reuses) .venv, installs the package
# with its test extras on a CPU build of torch, and runs the suite with the
# Triton kernels under the interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
# Idle OpenMP threads sleep instead of spinning: with another job on a 2-core
# machine, torch CPU training ran 13x faster (measured 2026-11-29).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned: the development and CI machines find a CPU build of
# 2.13.0 on local disk (an unpinned torch pulls a multi-GB CUDA build from PyPI).
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "triton==3.9.0" -e ".[test]"
export TRITON_INTERPRET=1
# Two workers (pytest-xdist), one test file each at a time: most tests use one
# core (interpreted kernels, Python), so two run in about 0.6x the time on the
# 2-core CI machine; a file's module and session fixtures (the sm_90 compile,
# the multi-process pools) are built once per worker. PYTEST_WORKERS=0: serial.
exec "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
