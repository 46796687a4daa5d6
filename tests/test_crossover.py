"""The crossover calibration (benchmarks/crossover.py) and loading its table
(qlora_triton.strategy.load_crossover). The timings on the CPU mean nothing;
what is tested is the rule that turns timings into a table, the run's
mechanics at toy sizes, and that a measured table changes the choice."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_triton as qt
from benchmarks import crossover as cx
from qlora_triton import strategy
from qlora_triton.ops.scratch import scratch_buffers


def _rows(wins: dict[int, bool], bucket="large", dtype="bfloat16", shapes=((4096, 4096), (8192, 8192))):
    rows = []
    for m, win in wins.items():
        for i, (n, k) in enumerate(shapes):
            fused = float(torch.rand(()) + 1.0)
            # A loss on one shape is enough to lose the M.
            dequant = fused * (0.5 if win or i == 0 else 1.5)
            rows.append({"bucket": bucket, "N": n, "K": k, "M": m, "dtype": dtype,
                         "fused_ms": fused, "dequant_ms": dequant})
    return rows


def test_crossover_is_where_dequant_wins_from_there_on():
    assert cx.crossover(_rows({64: False, 256: True, 1024: True})) == {("large", "bfloat16"): 256}
    # A win below a loss does not count: the run of wins must reach the largest M.
    assert cx.crossover(_rows({64: True, 256: False, 1024: True, 4096: True})) == {("large", "bfloat16"): 1024}
    assert cx.crossover(_rows({64: True, 256: False})) == {("large", "bfloat16"): None}
    both = _rows({64: True, 128: True}) + _rows({64: False, 128: True}, dtype="float16")
    assert cx.crossover(both) == {("large", "bfloat16"): 64, ("large", "float16"): 128}


def test_smoke_run_writes_a_table(tmp_path, monkeypatch):
    out = tmp_path / "crossover.json"
    written = []  # every document written, in order: the file grows row by row

    def write_json(path, doc):
        written.append(json.loads(json.dumps(doc)))
        return real_write_json(path, doc)

    real_write_json = cx.write_json
    monkeypatch.setattr(cx, "write_json", write_json)
    with qt.force_backend("triton" if torch.cuda.is_available() or qt.backend.INTERPRET else "torch"):
        assert cx.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [len(d["rows"]) for d in written] == [*range(1, len(data["rows"]) + 1), len(data["rows"])]
    assert [d["complete"] for d in written] == [False] * len(data["rows"]) + [True]
    assert written[0]["rows"] == data["rows"][:1] and data["complete"] is True
    assert data["gpu_kind"] == strategy.gpu_kind(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert len(data["rows"]) == 2 * len(cx.SMOKE_M) * len(cx.DTYPES)
    assert all(r["fused_ms"] > 0 and r["dequant_ms"] > 0 for r in data["rows"])
    assert {(r["bucket"], r["dtype"]) for r in data["crossover"]} == {("small", "bfloat16"), ("small", "float16")}
    assert not scratch_buffers()  # released after the run
    if data["gpu_kind"] == "cpu":
        with pytest.raises(ValueError, match="not a CUDA GPU"):
            strategy.load_crossover(out)


def test_a_measured_table_changes_the_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(strategy, "CROSSOVER", dict(strategy.CROSSOVER))
    table = {"gpu_kind": "sm_90", "crossover": [
        {"bucket": "large", "dtype": "bfloat16", "dequant_from_m": 64},
        {"bucket": "large", "dtype": "float16", "dequant_from_m": None}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert strategy.load_crossover(path) == {("sm_90", "large", torch.bfloat16): 64,
                                             ("sm_90", "large", torch.float16): None}
    with strategy.assume_gpu_kind("sm_90"):
        cpu = torch.device("cpu")
        assert strategy.select_strategy(64, 4096, 4096, torch.bfloat16, cpu) == "dequant"
        assert strategy.select_strategy(63, 4096, 4096, torch.bfloat16, cpu) == "fused"
        assert strategy.select_strategy(8192, 4096, 4096, torch.float16, cpu) == "fused"
    for bad, match in [({"gpu_kind": "sm_90"}, "not a table"),
                       ({"gpu_kind": "sm_90", "crossover": [{"bucket": "huge", "dtype": "bfloat16",
                                                             "dequant_from_m": 4}]}, "not a table"),
                       ({"gpu_kind": "sm_90", "crossover": [{"bucket": "large", "dtype": "bfloat16",
                                                             "dequant_from_m": 0}]}, "dequant_from_m")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            strategy.load_crossover(path)
    with pytest.raises(ValueError, match="not a table"):
        strategy.load_crossover(tmp_path / "missing.json")
