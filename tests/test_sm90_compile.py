"""Every kernel family compiles for sm_90 (Hopper) without spilling.

The rest of the suite runs the kernels under TRITON_INTERPRET=1, which never
lowers them to PTX: a kernel that does not compile with Triton's CUDA backend,
or a config that spills or overflows shared memory, would only show on the GPU
machine. Triton compiles for a target ahead of time without a GPU, so this test
runs ``scripts/sm90_compile.py --subset`` (each kernel family once per
constexpr branch, matmuls with their largest GPU tile) in a subprocess with
TRITON_INTERPRET unset (the package builds its GPU config lists and tile sizes
only then). The full enumeration, every autotune config, is the CLI without
``--subset``; see benchmarks/results/sm90-compile-*/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sm90_compile.py"


def _ptxas() -> str | None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import sm90_compile

        return sm90_compile.find_ptxas()
    except Exception:  # noqa: BLE001 - no CUDA backend at all: skip below
        return None
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if _ptxas() is None:
        pytest.skip("Triton's CUDA backend cannot compile here: no ptxas (bundled with Triton, "
                    "on PATH or under /usr/local/cuda*)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A private cache: a compile cached by another run must not hide a failure.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences Triton 3.9's warning
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "--quiet", "--jobs",
                           str(min(2, os.cpu_count() or 1)), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"sm90_compile.py wrote no report (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_every_family_is_covered(report):
    families = {r["family"] for r in report["variants"]}
    assert families == {"gemm", "gemv", "gemv_fma", "gemv_dot", "grad_input", "nf4_quantize",
                        "blockwise_8bit_quantize", "nf4_dequantize", "blockwise_8bit_dequantize",
                        "adamw", "gemm_words", "grad_input_words"}
    labels = [f"{r['family']} {r['label']}" for r in report["variants"]]
    for fam in ("gemm", "gemv", "grad_input"):  # the per-element decode: K % blocksize != 0 only
        for branch in ("general", "dq=0", "dq=1", "bf16", "fp32"):
            assert any(lab.startswith(fam) and f" {branch}" in lab for lab in labels), (fam, branch)
    for fam, branch in [("gemv_fma", "dq=0"), ("gemv_fma", "dq=1"), ("gemv_fma", "fp32"),
                        ("gemv_dot", "bs=32"), ("gemv_dot", "bs=64"), ("gemv_dot", "fp32"),
                        ("adamw", "8-bit"), ("adamw", "32-bit"), ("adamw", "bf16"),
                        ("nf4_dequantize", "bf16"), ("nf4_dequantize", "dq=1"),
                        ("gemm_words", "bf16"), ("gemm_words", "fp32"), ("gemm_words", "dq=0"),
                        ("grad_input_words", "bf16"), ("grad_input_words", "fp32"),
                        ("grad_input_words", "SPLIT_N=2"), ("gemv_fma", "lora=1"),
                        ("gemv_dot", "lora=1")]:
        assert any(lab.startswith(fam) and branch in lab for lab in labels), (fam, branch)


def test_every_variant_compiles_to_a_cubin(report):
    failed = {f"{r['family']} {r['label']}": r.get("error") or r.get("ptxas_error")
              for r in report["variants"] if not r["ok"]}
    assert not failed, failed


def test_no_spills_and_shared_memory_fits(report):
    bad = {}
    for r in report["variants"]:
        if r.get("spill_stores") is None or r["spill_stores"] > 0 or r["spill_loads"] > 0:
            bad[f"{r['family']} {r['label']}"] = (f"{r.get('registers')} registers, spills "
                                                  f"{r.get('spill_stores')}/{r.get('spill_loads')} B")
        if not r.get("smem_fits"):
            bad[f"{r['family']} {r['label']}"] = f"{r.get('shared')} B shared memory"
    assert not bad, bad
