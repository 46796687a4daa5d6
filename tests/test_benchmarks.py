"""The benchmark suite cannot rot: ``python -m benchmarks --smoke`` runs every
case on every provider at tiny size on the CPU, and its JSON must match the
documented schema (benchmarks/schema.py, benchmarks/README.md)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not installed

from benchmarks import report  # noqa: E402
from benchmarks.cases import OPS, Case, all_cases  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from benchmarks.schema import validate  # noqa: E402
from benchmarks.suite import gpu_slug  # noqa: E402

import qlora_triton as qt  # noqa: E402

# Every op whose qlora_triton API exists in this tree must run on qlora_triton
# (the LoRA layer and the optimizers arrive from their own branches).
QT_OPS = {"quantize", "dequantize", "matmul_fwd", "matmul_grad_input"}
if hasattr(qt, "LoRALinear4bit"):
    QT_OPS.add("lora_fwd_bwd")
if hasattr(qt, "PagedAdamW") and hasattr(qt, "PagedAdamW8bit"):
    QT_OPS.add("optimizer_step")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, pathlib.Path, str]:
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout


def test_smoke_matches_schema(smoke):
    doc, _, _ = smoke
    assert validate(doc) == []
    assert doc["meta"]["smoke"] is True and doc["meta"]["device"] == "cpu"
    assert doc["meta"]["gpu_slug"] == "cpu"
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0


def test_smoke_covers_every_case_and_provider(smoke):
    doc, _, _ = smoke
    rows = {(r["case"], r["provider"]): r for r in doc["results"]}
    expected = {(c.id, p) for c in all_cases(smoke=True) for p in PROVIDERS}
    assert set(rows) == expected
    assert {r["op"] for r in doc["results"]} == set(OPS)
    for (case, provider), row in rows.items():
        installed = doc["providers"][provider] == "ok"
        if provider == "qlora_triton" and row["op"] in QT_OPS:
            assert row["status"] == "ok", (case, row["error"])
        if provider in ("bitsandbytes", "torchao", "bf16") and installed:
            # every provider that installs on the CPU runs every op it has
            assert row["status"] in ("ok", "n/a"), (case, provider, row["error"])
        if row["status"] == "ok":
            assert row["ms"] > 0 and row["x_floor"] > 0


def test_smoke_writes_readable_results(smoke):
    doc, out, stdout = smoke
    md = (out / "results.md").read_text()
    assert doc["meta"]["torch"] in md and "| op | shape | M |" in md and "## Rates (per provider)" in md
    assert (out / "matmul_fwd_speedup.png").stat().st_size > 0
    for provider in PROVIDERS:
        assert provider in stdout  # the table's columns
    assert "results:" in stdout


def test_memory_plot_and_table(smoke, tmp_path):
    """CUDA-only numbers (memory) drawn from a smoke document with them filled in."""
    doc = copy.deepcopy(smoke[0])
    for i, row in enumerate(doc["results"]):
        if row["status"] == "ok":
            row["peak_mem_MB"], row["resident_mem_MB"] = 1.0 + i, 2.0 + i
    assert validate(doc) == []
    plots = report.write_plots(doc, tmp_path)
    assert tmp_path / "memory.png" in plots
    assert "## Peak memory (MB)" in report.markdown(doc, plots)


def test_validator_rejects_broken_documents(smoke):
    doc = smoke[0]
    broken = copy.deepcopy(doc)
    del broken["meta"]["git_commit"]
    broken["results"][0]["status"] = "fine"
    broken["results"][1]["ms"] = "fast"
    broken["results"][2]["extra"] = 1
    errors = validate(broken)
    assert any("git_commit" in e for e in errors)
    assert any("'fine'" in e for e in errors)
    assert any("ms" in e for e in errors)
    assert any("extra" in e for e in errors)
    ok_row = next(i for i, r in enumerate(doc["results"]) if r["status"] == "ok")
    no_time = copy.deepcopy(doc)
    no_time["results"][ok_row]["ms"] = None
    assert any("positive ms" in e for e in validate(no_time))
    dup = copy.deepcopy(doc)
    dup["results"].append(dup["results"][0])
    assert any("duplicate" in e for e in validate(dup))


def test_floors():
    # matmul at M=1 is memory-bound on the packed weight, at M=4096 compute-bound
    small, big = Case("matmul_fwd", (4096, 4096), m=1), Case("matmul_fwd", (4096, 4096), m=4096)
    assert small.floor_ms(4300.0, 790.0)[1] == "memory"
    assert big.floor_ms(4300.0, 790.0)[1] == "compute"
    assert big.flops() == 2 * 4096**3
    # 4096x4096 NF4 + double quant: 8 MiB codes, 256 Ki uint8 scales, 1 Ki fp32 second-level scales
    assert small.bytes_moved() == 2 * (4096 + 4096) + 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024
    assert Case("optimizer_step", params=10, tensors=1, variant="32bit").bytes_moved() == 280


def test_gpu_slug():
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"


def test_cli_bench_passes_options_through(capsys):
    from qlora_triton import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_cli_bench_runs_the_suite(tmp_path):
    from qlora_triton import cli

    out = tmp_path / "cli"
    assert cli.main(["bench", "--smoke", "--ops", "quantize", "--providers", "bf16,bitsandbytes",
                     "--out", str(out), "--no-plots", "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    assert {(r["op"], r["provider"]) for r in doc["results"]} == {("quantize", "bf16"), ("quantize", "bitsandbytes")}


def test_case_filters():
    """--shapes and --m keep a subset of the run's cases; values outside the run are refused."""
    cases = all_cases(False, ("matmul_fwd", "lora_fwd_bwd", "optimizer_step"), ((4096, 11008),), (16, 512))
    assert [c.id for c in cases] == ["matmul_fwd-4096x11008-M16", "lora_fwd_bwd-4096x11008-M512",
                                     "optimizer_step-32bit-1000000000-params", "optimizer_step-8bit-1000000000-params"]
    with pytest.raises(ValueError, match="4096x4096"):
        all_cases(True, shapes=((4096, 4096),))
    with pytest.raises(ValueError, match="got 3"):
        all_cases(False, ms=(3,))


def test_rates():
    row = {"status": "ok", "ms": 2.0, "flops": 8 * 10**12, "bytes": 6 * 10**9}
    assert report.rates(row) == (4000.0, 3000.0)  # TFLOP/s, GB/s
    assert report.rates(dict(row, flops=0)) == (None, 3000.0)
    assert report.rates(dict(row, status="n/a", ms=None)) == (None, None)


def test_missing_or_failing_provider_is_a_row_not_a_crash(monkeypatch):
    import torch

    from benchmarks import suite
    from benchmarks.timing import Ceilings, Timer

    case = Case("matmul_fwd", (64, 64), m=2)
    timer, ceilings = Timer(torch.device("cpu")), Ceilings(1.0, 1.0, 1, 1)
    row = suite.run_case(case, "torchao", "not installed", timer, ceilings, None)
    assert (row["status"], row["error"], row["ms"]) == ("not installed", "not installed", None)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(suite, "build", broken)
    row = suite.run_case(case, "qlora_triton", None, timer, ceilings, None)
    assert row["status"] == "error" and row["error"] == "RuntimeError: kernel exploded" and row["ms"] is None

    # a fast but wrong kernel is an error, not a time
    for err in (0.5, float("nan")):
        monkeypatch.setattr(suite, "build", lambda *a, err=err, **k: suite.Checked(lambda: None, lambda: err))
        row = suite.run_case(case, "qlora_triton", None, timer, ceilings, None)
        assert row["status"] == "error" and "rel_err" in row["error"] and row["ms"] is None


def test_smoke_checks_matmul_results(smoke):
    doc = smoke[0]
    for row in doc["results"]:
        if row["op"].startswith("matmul") and row["status"] == "ok":
            assert 0 < row["rel_err"] <= 2e-2, row


def test_smoke_records_the_strategy_that_ran(smoke):
    from qlora_triton import backend as _backend

    rows = [r for r in smoke[0]["results"] if r["provider"] == "qlora_triton"]
    for row in rows:
        if not _backend.INTERPRET or row["op"] not in ("matmul_fwd", "matmul_grad_input", "lora_fwd_bwd"):
            assert row["strategy"] is None, row  # the reference, or no matmul
        elif row["op"] == "matmul_grad_input":
            assert row["strategy"] == "fused", row  # grad-input has no GEMV
        else:  # the CPU's default: never dequant
            assert row["strategy"] == ("gemv" if row["m"] <= 16 else "fused"), row


def test_smoke_reports_each_strategys_extra_peak_bytes(smoke):
    rows = [r for r in smoke[0]["results"] if r["provider"] == "qlora_triton"
            and r["op"] in ("matmul_fwd", "matmul_grad_input", "lora_fwd_bwd")]
    assert rows and all(r["status"] == "ok" for r in rows)
    for row in rows:
        extra, layer = row["strategy_extra_peak_bytes"], row["n"] * row["k"] * 2  # bf16
        assert row["strategy_memory"] == "meta_tensor_accounting", row  # the CPU: no allocator to ask
        assert (extra["gemv"] is None) == (row["m"] > 16 or row["op"] == "matmul_grad_input"), row
        if row["op"] == "lora_fwd_bwd":  # plus the [M, N] output the step frees again
            assert extra["dequant"] - extra["fused"] == layer, row
        else:
            assert extra["fused"] == 0 and extra["dequant"] == layer, row
    bad = copy.deepcopy(smoke[0])
    bad["results"][smoke[0]["results"].index(rows[0])]["strategy_extra_peak_bytes"]["cublas"] = 0
    assert any("cublas" in e for e in validate(bad))


def test_strategy_memory_table_on_llama_shapes(capsys):
    from benchmarks.strategy_memory import extra_peak_bytes, main

    kind, extra = extra_peak_bytes(Case("matmul_fwd", (28672, 8192), 4096), "cpu")
    assert kind == "meta_tensor_accounting"
    assert extra == {"gemv": None, "fused": 0, "dequant": 28672 * 8192 * 2}
    assert main(["--shapes", "11008x4096", "--m", "1,4096", "--ops", "matmul_fwd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines[2:4]] == ["MiB"] * 2 and "86.0" in lines[3]


def test_resume_keeps_earlier_rows(tmp_path):
    from benchmarks.suite import main

    common = ["--smoke", "--providers", "bf16,bitsandbytes", "--no-plots", "--no-progress"]
    assert main([*common, "--ops", "quantize", "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    assert len((tmp_path / "a" / "rows.jsonl").read_text().splitlines()) == len(first) == 2
    assert main([*common, "--ops", "quantize,dequantize", "--out", str(tmp_path / "b"),
                 "--resume", str(tmp_path / "a" / "rows.jsonl")]) == 0
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert validate(doc) == []
    kept = ("ms", "status", "peak_mem_MB", "rel_err")  # kept, not rerun (floors follow the new ceilings)
    assert [{k: r[k] for k in kept} for r in doc["results"][:2]] == [{k: r[k] for k in kept} for r in first]
    assert [r["op"] for r in doc["results"]] == ["quantize"] * 2 + ["dequantize"] * 2
    assert len((tmp_path / "b" / "rows.jsonl").read_text().splitlines()) == 4


def test_forced_strategy_is_run_and_recorded(tmp_path):
    from benchmarks.suite import main

    from qlora_triton import backend as _backend

    assert main(["--smoke", "--providers", "qlora_triton", "--ops", "matmul_fwd,matmul_grad_input",
                 "--m", "1", "--strategy", "dequant", "--no-plots", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["meta"]["strategy"] == "dequant"
    assert doc["results"] and all(r["status"] == "ok" for r in doc["results"])
    # Without the interpreter the CPU runs the reference: no strategy ran.
    want = "dequant" if _backend.INTERPRET else None
    assert [r["strategy"] for r in doc["results"]] == [want] * len(doc["results"])
    bad = copy.deepcopy(doc)
    bad["results"][0]["strategy"] = "cublas"
    assert any("strategy" in e for e in validate(bad))


def test_time_strategies_times_each_strategy_side_by_side(tmp_path):
    from benchmarks.suite import main

    assert main(["--smoke", "--providers", "qlora_triton", "--ops", "matmul_fwd,matmul_grad_input",
                 "--m", "1", "--time-strategies", "--no-plots", "--no-progress", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["results"]
    for row in doc["results"]:
        times = row["strategy_ms"]
        assert set(times) == {"gemv", "fused", "dequant"} and times["fused"] > 0 and times["dequant"] > 0
        assert (times["gemv"] is None) == (row["op"] == "matmul_grad_input"), row  # M = 1
    bad = copy.deepcopy(doc)
    bad["results"][0]["strategy_ms"]["cublas"] = 1.0
    assert any("cublas" in e for e in validate(bad))
