"""benchmarks/gpu_check.sh, the one GPU-machine script, fits its call and cannot rot:
its stage limits add up to at most 420 s, every import it makes is on the GPU
machine or in the carried wheels (benchmarks/gpu_machine.py), and its CPU dry
run (DRY_RUN=1) leaves in $OUT only what the device tool brings back, written
stage by stage, with the short table last."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO))

from benchmarks import gpu_machine  # noqa: E402
from benchmarks.schema import validate  # noqa: E402


def _run(tmp_path, **env):
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT=str(out), **env)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, out


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_stage_limits_over_the_budget_stop_before_anything_runs(tmp_path):
    proc, out = _run(tmp_path, T_TESTS="300", STAGES="install")
    assert proc.returncode == 2 and "over the 420 s budget" in proc.stdout
    assert not (out / "bench").exists() and "== install" not in (out / "log.txt").read_text()


def test_gpu_check_dry_run(tmp_path):
    proc, out = _run(tmp_path, STAGES="install crossover bench preset",
                     BENCH_ARGS="--ops quantize --providers qlora_triton,bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    limits = re.search(r"^stage limits: (.*)total (\d+) s of 420 s", log, re.M)
    parts = dict(re.findall(r"(\w+) (\d+)s", limits.group(1)))
    assert set(parts) == {"install", "env", "tests", "bench", "diag", "preset", "crossover", "decode"}
    assert sum(map(int, parts.values())) == int(limits.group(2)) <= 420
    assert "wheels to carry (.whl/, bash scripts/gpu_wheels.sh): bitsandbytes==0.50.2 liger-kernel==0.8.5" in log
    assert "each on the GPU machine or carried" in log and "MISSING" not in log
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files  # what the device tool returns
    # rows.jsonl goes once results.json holds the rows: a full run returns 8 files at most
    assert {str(f) for f in files} == {"log.txt", "crossover.json", "bench/results.json", "bench/results.md",
                                       "preset/preset-tiny.json"}
    crossover = json.loads((out / "crossover.json").read_text())
    assert crossover["gpu_kind"] == "cpu" and crossover["complete"] and crossover["rows"]
    doc = json.loads((out / "bench" / "results.json").read_text())
    assert validate(doc) == [] and doc["meta"]["smoke"]
    assert {(r["op"], r["provider"], r["status"]) for r in doc["results"]} == {
        ("quantize", "qlora_triton", "ok"), ("quantize", "bf16", "n/a")}
    preset = json.loads((out / "preset" / "preset-tiny.json").read_text())
    assert preset["vs_lora16"]["step_time"] > 0  # the preset stage runs the 16-bit LoRA baseline too
    last = proc.stdout.strip().splitlines()[-6:]  # the stage table comes last
    assert last[0].split() == ["stage", "status", "time", "note"]
    assert [line.split()[:2] for line in last[1:]] == [["install", "ok"], ["env", "ok"], ["bench", "ok"],
                                                      ["preset", "ok"], ["crossover", "ok"]]
    assert re.search(r"QLoRA step \d+ ms, peak [\d.]+ GiB; 16-bit LoRA step \d+ ms$", last[4])
    # the report a session writes from the folder the device tool brings back
    from benchmarks import gpu_report

    text = gpu_report.report(out)
    assert "| quantize | 128x128 |" in text and "16-bit LoRA (PEFT LoRA on dense bf16 weights" in text
    assert "rows, complete" in text and "pytest -m gpu: not run" in text
    assert log.strip().splitlines()[-1] == last[-1]


def test_the_package_benchmarks_and_tests_import_only_what_the_machine_has():
    problems, soft, used = gpu_machine.check()
    assert problems == []
    assert {"torch", "triton", "transformers", "bitsandbytes"} <= used


def test_imports_missing_on_the_machine_are_found(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "hard.py").write_text("import torch\nfrom trl import SFTTrainer\n")
    (tmp_path / "pkg" / "soft.py").write_text(
        "import pytest\ntry:\n    import datasets\nexcept ImportError:\n    datasets = None\n"
        "torchao = pytest.importorskip('torchao')\n")
    problems, soft, used = gpu_machine.check(tmp_path, ("pkg",))
    assert problems == ["pkg/hard.py:2: imports trl (trl): not on the GPU machine, not in WHEELS"]
    assert sorted(s.split(":")[0] for s in soft) == ["pkg/soft.py", "pkg/soft.py"]
    assert used == {"torch", "pytest"}


def test_wheel_requirements_must_be_on_the_machine_or_carried(tmp_path):
    with zipfile.ZipFile(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "w") as zf:
        zf.writestr("bitsandbytes-0.50.2.dist-info/METADATA",
                    "Name: bitsandbytes\nRequires-Dist: torch<3,>=2.3\nRequires-Dist: numpy>=1.17\n"
                    "Requires-Dist: lion-pytorch; extra == \"test\"\nRequires-Dist: somethingelse>=1\n")
    with zipfile.ZipFile(tmp_path / "liger_kernel-0.8.5-py3-none-any.whl", "w") as zf:
        zf.writestr("liger_kernel-0.8.5.dist-info/METADATA",
                    "Name: liger-kernel\nRequires-Dist: torch>=2.1.2\nRequires-Dist: triton>=2.3.1\n")
    assert gpu_machine.check_wheel_requirements(tmp_path) == [
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl requires somethingelse: "
        "not on the GPU machine, not carried"]
    assert gpu_machine.check_wheel_requirements(tmp_path / "empty") == [
        f"{tmp_path / 'empty'}: no wheel for {name}" for name in ("bitsandbytes", "liger-kernel")]
