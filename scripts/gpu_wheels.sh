#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels the GPU check carries to the lent
# GPU machine: what it imports that the machine lacks (benchmarks/gpu_machine.py
# holds both lists), for that machine's Python (3.12, x86-64 manylinux), without
# dependencies (the machine has them; the check verifies each wheel's needs).
# Then a call of the device tool names ".whl" in carry (see benchmarks/README.md).
#
#   bash scripts/gpu_wheels.sh            # PYTHON=python3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mapfile -t specs < <("$PY" -m benchmarks.gpu_machine --wheels)
mapfile -t target < <("$PY" -m benchmarks.gpu_machine --download-args)
mkdir -p .whl
# One version of each: a stale wheel of another version would stop the install there.
for spec in "${specs[@]}"; do
  name=${spec%%==*}
  find .whl -maxdepth 1 -name "${name//-/_}-*.whl" ! -name "${name//-/_}-${spec##*==}-*" -delete
done
"$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d .whl "${specs[@]}"
"$PY" -m benchmarks.gpu_machine --check --wheel-dir .whl >/dev/null
du -ch .whl/*.whl | tail -1 | sed 's/total$/in .whl\/ (a call carries at most 64 MiB with the tree)/'
