"""benchmarks/gpu_check.sh, the one GPU-machine script, cannot rot: it parses,
and its CPU dry run (DRY_RUN=1: no installs, the bench with --smoke) leaves in
$OUT only what the device tool brings back (at most 8 plain files, no folders
here), with the results folder packed into one tar and the summary printed last."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO))

from benchmarks.schema import validate  # noqa: E402


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT=str(out), STAGES="crossover bench",
               BENCH_ARGS="--ops quantize --providers qlora_triton,bf16 --no-plots",
               RESUME=str(tmp_path / "absent.jsonl"))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8, files
    assert {"setup.log", "bench.log", "rows.jsonl", "bench_results.tar.gz", "summary.txt",
            "crossover.json"} <= set(files)
    crossover = json.loads((out / "crossover.json").read_text())
    assert crossover["gpu_kind"] == "cpu" and crossover["rows"] and crossover["crossover"]
    with tarfile.open(out / "bench_results.tar.gz") as tar:
        names = tar.getnames()
        doc = json.load(tar.extractfile(next(n for n in names if n.endswith("/results.json"))))
    assert validate(doc) == [] and doc["meta"]["smoke"]
    assert {(r["op"], r["provider"], r["status"]) for r in doc["results"]} == {
        ("quantize", "qlora_triton", "ok"), ("quantize", "bf16", "n/a")}
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2
    last = proc.stdout.strip().splitlines()[-4:]  # the summary table comes last
    assert last[0].split() == ["stage", "status", "time", "note"]
    assert [line.split()[:2] for line in last[1:]] == [["env", "ok"], ["crossover", "ok"], ["bench", "ok"]]
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == last[3]
