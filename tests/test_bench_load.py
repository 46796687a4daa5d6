"""Smoke test of benchmarks/bench_load.py: a few-MB checkpoint, loaded with
NF4Config in a child process; the numbers are reported, not asserted against
a threshold (speed and memory live in the benchmark's own runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def test_bench_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--smoke",
                           "--methods", "nf4", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["method"] == "nf4" and row["nf4_layers"] == 14
    assert result["checkpoint_bytes"] > 0 and row["hwm_bytes"] > 0 and row["anon_bytes"] >= 0
    assert "high-water RSS" in proc.stdout
