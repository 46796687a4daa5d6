"""benchmarks/gpu_report.py: the GPU check's folder as one report, each number read
from its files (a synthetic folder here; the dry run's folder in test_gpu_check)."""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import gpu_report  # noqa: E402


def _row(provider: str, ms: float, **extra) -> dict:
    return {"case": "matmul_fwd-4096x4096-M1", "op": "matmul_fwd", "shape": "4096x4096", "n": 4096, "k": 4096,
            "m": 1, "variant": "", "provider": provider, "ms": ms, "floor_ms": 0.002, "x_floor": ms / 0.002,
            **extra}


def _folder(tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)
    (out / "preset").mkdir()
    estimate = {"kernel": "gemv_fma", "config": "32x256 w1 s1 SPLIT_K=16", "triton": "3.6.0",
                "thread_instr_per_weight": 4.6, "bound_over_floor": 1.2, "floor_us": 2.0, "binding": "issue"}
    rows = [_row("qlora_triton", 0.010, sass_estimate=estimate), _row("bitsandbytes", 0.008), _row("bf16", 0.009)]
    (out / "bench" / "results.json").write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "triton": "3.6.0"},
                                                            "results": rows}))
    diag = [{"part": "host_vs_gpu", "N": 4096, "K": 4096, "M": 1, "provider": p, "host_us": h, "wall_us": h,
             "graph_us": g} for p, h, g in (("qlora_triton", 150.0, 3.0), ("bitsandbytes", 50.0, 2.5),
                                            ("bf16", 20.0, 2.7))]
    diag += [{"part": "lora_host_vs_gpu", "N": 4096, "K": 4096, "M": 2048, "provider": "qlora_triton",
              "host_us": 900.0, "wall_us": 950.0, "busy_us": 300.0, "kernels": 17.0},
             {"part": "step_wall_vs_gpu", "preset": "7b", "layers": 2, "tokens": 512, "method": "qlora",
              "speedups": ["fuse", "liger"], "wall_us": 40000.0, "busy_us": 8000.0, "kernels": 560.0},
             {"part": "step_wall_vs_gpu", "preset": "7b", "layers": 2, "tokens": 512, "method": "lora16",
              "error": "RuntimeError('out of luck')"}]
    (out / "diag.jsonl").write_text("\n".join(json.dumps(r) for r in diag) + "\n")
    preset = {"preset": "7b", "device_name": "NVIDIA H200", "batch_size": 1, "seq_len": 512,
              "speedups": ["fuse", "liger"], "step_seconds": [4.0, 0.3, 0.3], "step_seconds_median": 0.3,
              "tokens_per_s": 1706.7, "memory": {"peak_bytes": 4 * 2**30}, "estimate_bytes": {"total": 5 * 2**30},
              "lora16": {"method": "PEFT LoRA", "liger": "liger", "step_seconds_median": 0.2,
                         "memory": {"delta_bytes": 16 * 2**30}},
              "vs_lora16": {"step_time": 1.5, "peak_memory": 0.25}}
    (out / "preset" / "preset-7b.json").write_text(json.dumps(preset))
    (out / "pytest.log").write_text("FAILED tests/test_gpu.py::test_x - AssertionError\n"
                                    "==== 1 failed, 130 passed in 80.00s ====\n")
    (out / "log.txt").write_text("== summary\nstage     status            time  note\n"
                                 "tests     FAIL rc=1         90 s  1 failed\n")
    return out


def test_report_reads_every_number_from_the_folder(tmp_path):
    text = gpu_report.report(_folder(tmp_path))
    assert "gpu NVIDIA H200" in text and "tests     FAIL rc=1" in text
    assert "pytest -m gpu: 1 failed, 130 passed in 80.00s" in text
    assert "- FAILED tests/test_gpu.py::test_x - AssertionError" in text
    # estimate 1.2 x 2.0 us = 2.4 us beside 3.0 us measured: 1.25, the bound the profile names
    assert "| 4096x4096 M=1 | gemv_fma | 32x256 w1 s1 SPLIT_K=16 | 3.6.0 | issue | 1.200 | 2.4 | 3.0 | 1.25 |" in text
    assert "| 4096x4096 M=2048 qlora_triton | 900 | 300 | 3.00 | 17.0 |" in text
    assert "| 7b x2 layers, 512 tokens, qlora ['fuse', 'liger'] | 40000 | 8000 | 5.00 | 560.0 |" in text
    assert "error: RuntimeError('out of luck')" in text
    assert "QLoRA takes 1.50x" in text and "(QLoRA 0.25x)" in text
    flagged = text.split("## Slower than bitsandbytes")[1]
    assert "- do_bench matmul_fwd-4096x4096-M1: 0.0100 ms, 0.80x bitsandbytes' speed, 5.00x its floor" in flagged
    assert "- GPU time 4096x4096 M=1: 3.0 us, 0.83x bitsandbytes' speed, 1.50x its floor" in flagged
    assert "## Decode\n\nnot run" in text and "## Crossover\n\nnot run" in text


def test_nothing_flagged_says_none_and_a_missing_folder_is_named(tmp_path, capsys):
    out = _folder(tmp_path)
    doc = json.loads((out / "bench" / "results.json").read_text())
    for r in doc["results"]:
        r["ms"], r["x_floor"] = (0.0024, 1.2) if r["provider"] == "qlora_triton" else (0.02, 10.0)
    (out / "bench" / "results.json").write_text(json.dumps(doc))
    (out / "diag.jsonl").unlink()
    text = gpu_report.report(out)
    assert text.rstrip().endswith("the floor\n\nnone")
    assert "## GPU time (CUDA-graph replay) and host time per call\n\nnot run" in text
    assert gpu_report.main([str(tmp_path / "absent")]) == 2
    assert "OUT_DIR" in capsys.readouterr().err


def test_out_is_written_atomically(tmp_path):
    out = _folder(tmp_path)
    target = tmp_path / "report.md"
    assert gpu_report.main([str(out), "--out", str(target)]) == 0
    assert target.read_text() == gpu_report.report(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
