"""CUDA managed memory for optimizer states (qlora_triton/paged.py, kernels/).

On the CPU: the CUDA helper compiles (when nvcc is on PATH) and a missing
helper gives a message that says how to build it. The paging itself needs a
GPU (``@pytest.mark.gpu``): eviction frees device memory, prefetch takes it
back, paged updates equal non-paged ones bit for bit, oversubscription is
refused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import qlora_triton as qt
from qlora_triton import paged

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "kernels").glob("*.cu"))
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(source, tmp_path):
    out = tmp_path / (source.stem + ".so")
    result = subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-o", str(out), str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    symbols = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    for name in ("qlt_managed_alloc", "qlt_managed_free", "qlt_prefetch", "qlt_error_string"):
        assert name in symbols


def test_kernels_is_not_a_python_package():
    assert CUDA_SOURCES and not (ROOT / "kernels" / "__init__.py").exists()


def test_missing_helper_message(tmp_path):
    missing = tmp_path / "_managed_alloc.so"
    with pytest.raises(paged.ManagedMemoryError) as info:
        paged.helper(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "QLORA_TRITON_BUILD_CUDA=1 pip install" in message and "paged=False" in message


def test_unloadable_helper_message(tmp_path):
    bogus = tmp_path / "_managed_alloc.so"
    bogus.write_bytes(b"not a shared library")
    with pytest.raises(paged.ManagedMemoryError, match="could not be loaded"):
        paged.helper(bogus)


def test_optimizer_on_cuda_without_helper_says_how_to_build(monkeypatch, tmp_path):
    """A CUDA machine without the built helper, simulated: the optimizer asks
    for the helper when a paged CUDA parameter arrives."""
    monkeypatch.setattr(paged, "HELPER_PATH", tmp_path / "_managed_alloc.so")
    # Any trainable non-CPU tensor the check sees as CUDA (frozen ones get no state).
    fake_cuda = torch.empty(3, device="meta", requires_grad=True)
    monkeypatch.setattr(qt.PagedAdamW, "_is_paged", lambda self, p: self.paged and p is fake_cuda)
    with pytest.raises(paged.ManagedMemoryError, match="QLORA_TRITON_BUILD_CUDA=1"):
        qt.PagedAdamW([fake_cuda])
    qt.PagedAdamW([fake_cuda], paged=False)  # the documented way out


def test_managed_empty_on_cpu_is_plain():
    t = paged.managed_empty((3, 5), torch.bfloat16, "cpu")
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu"


# -- GPU ---------------------------------------------------------------------------


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.gpu
@gpu
def test_evict_moves_the_states_to_the_host_and_prefetch_brings_them_back():
    """The paging, as the driver records it. Not as ``torch.cuda.mem_get_info``
    reports it: on the H200 (driver 580.159.04, CUDA 13.0; benchmarks/results/h200-2026-12-04)
    its free figure did not move when 2 GiB of states were evicted or prefetched,
    while reading them after an eviction took 217 ms (page faults) against 0.64 ms
    after a prefetch."""
    n = 64 << 20  # 64M fp32 parameters: 512 MiB of PagedAdamW states
    p = torch.randn(n, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = qt.PagedAdamW([p])
    opt.step()
    states = [t for t in opt.state[p].values() if torch.is_tensor(t) and t.numel() == n]
    assert len(states) == 2
    assert opt.device_resident_bytes() == 2 * 4 * n
    opt.evict()
    torch.cuda.synchronize()
    assert opt.device_resident_bytes() == 0
    assert [paged.last_prefetch_location(t) for t in states] == [-1, -1]
    before = [t.clone() for t in states]  # read back through the host pages
    opt.prefetch()
    torch.cuda.synchronize()
    assert opt.device_resident_bytes() == 2 * 4 * n
    assert [paged.last_prefetch_location(t) for t in states] == [p.device.index] * 2
    for t, b in zip(states, before):
        assert torch.equal(t, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("opt_cls", [qt.PagedAdamW, qt.PagedAdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_updates_bit_identical_to_non_paged(opt_cls, dtype):
    shapes = [(1024, 4097), (1024, 1), (333,)]
    p0 = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, device="cuda", dtype=dtype) for s in shapes] for _ in range(10)]
    results = []
    for kw in (dict(paged=False), dict(paged=True), dict(paged=True, evict_after_step=True)):
        ps = [p.clone().requires_grad_() for p in p0]
        opt = opt_cls(ps, lr=1e-2, weight_decay=0.1, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            if kw.get("evict_after_step"):
                assert opt.device_resident_bytes() == 0
        results.append([p.detach() for p in ps])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_oversubscription_is_refused():
    free = _free()
    with pytest.raises(paged.ManagedMemoryError, match="refusing"):
        paged.managed_empty((free // 4 + (1 << 20),), torch.float32, "cuda")  # a bit more than free


@pytest.mark.gpu
@gpu
def test_managed_states_are_ordinary_cuda_tensors(tmp_path):
    p = torch.randn(5000, device="cuda", requires_grad=True)  # >= min_8bit_size: 8-bit state
    p.grad = torch.randn_like(p)
    opt = qt.PagedAdamW8bit([p], evict_after_step=True)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = qt.PagedAdamW8bit([p])
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert fresh.state[p]["exp_avg_codes"].is_cuda
