"""The optimizer benchmark's smoke mode runs every case once on the CPU."""

import importlib.util
from pathlib import Path


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optimizer.py"
    spec = importlib.util.spec_from_file_location("bench_optimizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_rows():
    bench = _load()
    rows = bench.run(smoke=True)
    names = {r["optimizer"] for r in rows}
    assert {"torch.AdamW(fused)", "qt.PagedAdamW", "qt.PagedAdamW8bit"} <= names
    for r in rows:
        assert r["ms"] > 0 and r["params"] == 64 * 257 and r["smoke"]
    assert "qt.PagedAdamW8bit" in bench.format_table(rows)
