"""The device audit (tests/device_audit.py) catches a test built on the wrong
device on a CPU-only machine: a small test file, run by pytest in a
subprocess with this suite's conftest, fails where it would on a GPU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import device_audit

TESTS = pathlib.Path(__file__).resolve().parent

WRONG_DEVICE = textwrap.dedent("""
    import torch
    import qlora_triton as qt

    def test_forgets_the_device(backend):  # the Triton leg must fail
        qt.quantize_nf4(torch.randn(8, 64))

    def test_mixes_devices(device):  # fails under any backend rule
        qw = qt.quantize_nf4(torch.randn(8, 64, device=device))
        qt.nf4_matmul(torch.randn(2, 64), qw)

    def test_cpu_string_in_the_triton_leg(backend):
        qt.dequantize_nf4(qt.quantize_nf4(torch.randn(8, 64, device="cpu")))

    def test_swallows_the_error(backend):  # still fails
        try:
            qt.quantize_nf4(torch.randn(8, 64))
        except Exception:
            pass

    def test_builds_on_the_device(backend, device):  # passes
        linear = torch.nn.Linear(64, 8).to(device)
        x = torch.randn(3, 64, device=linear.weight.device)
        assert qt.nf4_matmul(x, qt.quantize_nf4(linear.weight.detach())).shape == (3, 8)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the audit is for machines without CUDA")
@pytest.mark.skipif(not device_audit.ENABLED, reason="QLORA_TRITON_DEVICE_AUDIT=0")
def test_audit_fails_tests_built_on_the_wrong_device(tmp_path):
    (tmp_path / "test_wrong_device.py").write_text(WRONG_DEVICE)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "-rfEp",
         "-o", "addopts=", str(tmp_path / "test_wrong_device.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    failed = {line.split(" ")[1].split("::")[1] for line in out.splitlines() if line.startswith("FAILED ")}
    assert failed == {"test_forgets_the_device[triton]", "test_mixes_devices",
                      "test_cpu_string_in_the_triton_leg[triton]", "test_swallows_the_error[triton]"}, out[-3000:]
    assert "device audit: Triton kernel _nf4_quantize_kernel got a (512,) torch.float32 tensor" in out
    assert "born on the CPU at test_wrong_device.py:6," in out  # where it was born
    assert "mixes it with tensors on the fixture's device" in out
    assert "(device='cpu')" in out
    assert "5 passed" in out  # both legs of the good test, the torch legs of the others
