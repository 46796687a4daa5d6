"""benchmarks/bench_matmul.py --smoke runs (so the script cannot rot) and its
rows carry what the full benchmark reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_matmul_smoke(tmp_path):
    out = tmp_path / "rows.json"
    # The torch backend keeps this fast; the kernels' numerics are tested in
    # test_matmul.py under the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "benchmarks/bench_matmul.py", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_matmul
    finally:
        sys.path.pop(0)
    providers = {r["provider"] for r in rows}
    assert {"qlora_triton", "torch_bf16"} <= providers
    assert len(rows) == len(bench_matmul.cases(smoke=True)) * len(providers)
    assert {r["shape"] for r in rows} == set(bench_matmul.SHAPES)
    for r in rows:
        assert r["time_ms"] > 0 and math.isfinite(r["tflops"]) and r["weight_gbps"] > 0
        assert all(f"vs_{p}" in r for p in providers - {r["provider"]})
        if r["rel_err"] is not None:  # the 4-bit providers against x @ dequantize(W).T
            assert r["rel_err"] < 1e-2
    assert "qlora_triton" in proc.stdout
