"""The per-op entry points (benchmarks/bench_matmul.py, bench_optimizer.py)
run as scripts with --smoke, so they cannot rot. They are the suite restricted
to their ops (the suite's own smoke run is checked in test_benchmarks.py):
here, only that each runs its ops and no others, and that its per-provider
table prints the rates of the rows it measured."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not installed

from benchmarks.cases import all_cases  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from benchmarks.schema import validate  # noqa: E402


@pytest.mark.parametrize("script, ops", [("bench_matmul.py", ("matmul_fwd",)),
                                         ("bench_optimizer.py", ("optimizer_step",))])
def test_per_op_script_smoke(tmp_path, script, ops):
    # Run from another folder: the script must find the suite by itself.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(tmp_path),
                           "--no-plots", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == []
    assert doc["meta"]["command"].startswith(f"benchmarks/{script} --smoke")
    rows = {(r["case"], r["provider"]): r for r in doc["results"]}
    assert set(rows) == {(c.id, p) for c in all_cases(smoke=True, ops=ops) for p in PROVIDERS}
    header = next(line for line in proc.stdout.splitlines() if line.startswith("op "))
    assert all(col in header for col in ("ms", "TFLOP/s", "GB/s", "rel_err", "x_floor", "vs bitsandbytes"))
    for row in rows.values():
        if row["provider"] == "qlora_triton":
            assert row["status"] == "ok", row["error"]
            # the table's GB/s is the row's fewest bytes over its time
            line = next(line for line in proc.stdout.splitlines()
                        if line.split()[:1] == [row["op"]] and " qlora_triton " in line
                        and f" {row['m'] if row['m'] is not None else row['variant']} " in line)
            assert f" {row['bytes'] / row['ms'] / 1e6:.4g} " in line, line
