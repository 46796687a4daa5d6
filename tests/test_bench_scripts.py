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


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The per-provider table of a script's output, as (header, rows of cells);
    the cells are cut at the spans of the dashes under the header."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    spans, col = [], 0
    for dashes in lines[start + 1].split(" "):
        if dashes:
            spans.append((col, col + len(dashes)))
        col += len(dashes) + 1
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    body = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        body.append(cut(line))
    return cut(lines[start]), body


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
    header, table = _table(proc.stdout)
    assert all(col in header for col in ("ms", "TFLOP/s", "GB/s", "rel_err", "x_floor", "vs bitsandbytes"))
    for row in rows.values():
        if row["provider"] == "qlora_triton":
            assert row["status"] == "ok", row["error"]
            # the table's GB/s is the row's fewest bytes over its time
            # (cells read by the column spans of the dashes under the header: a substring
            # test once took an ms of 16 for the M column of M=16)
            key = [row["op"], row["shape"], str(row["m"]) if row["m"] is not None else row["variant"], "qlora_triton"]
            line = next(cells for cells in table if cells[:4] == key)
            assert line[header.index("GB/s")] == f"{row['bytes'] / row['ms'] / 1e6:.4g}", line
