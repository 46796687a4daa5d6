"""NaN, Inf, overflow and subnormals through every cast the kernels do by hand.

The GPU's canonical fp32 NaN is 0x7FFFFFFF; the interpreter (numpy on x86)
makes 0xFFC00000 / 0x7FC00000 and carries an input NaN's payload through. So
the bit patterns are fed in on purpose: straight into ``cast_rtne`` (a tiny
test kernel), as scales of the dequantize kernels (the payload survives the
multiply on both), and as NaN / Inf in the inputs of every kernel family that
casts its result (GEMV at M = 1 and 2..16, fused GEMM, grad-input, dequantize,
the AdamW step). Finite values must match torch's ``.to()`` bit for bit; NaN
must stay NaN and Inf stay Inf, never become 0.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch
import triton
import triton.language as tl

import qlora_triton as qt
from qlora_triton import backend as _backend
from qlora_triton.codebooks import dynamic_map
from qlora_triton.ops import matmul as ops_matmul
from qlora_triton.ops.cast import cast_rtne

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
HALF = [torch.bfloat16, torch.float16]

# fp32 bit patterns (as unsigned ints).
NAN_BITS = [
    0x7FFFFFFF, 0xFFFFFFFF,  # the GPU's canonical NaN, and with the sign set
    0x7FC00000, 0xFFC00000,  # the interpreter's (x86's) quiet NaNs
    0x7FFF8000, 0x7FFF7FFF, 0x7FFE8000, 0x7FFEFFFF, 0xFFFF8001,  # payloads at the rounding carry
    0x7F800001, 0xFF800001, 0x7F808000, 0x7F80FFFF, 0x7FBFFFFF,  # signalling NaNs
]
SPECIAL_BITS = NAN_BITS + [
    0x7F800000, 0xFF800000,  # +-Inf
    0x7F7FFFFF, 0xFF7FFFFF,  # largest finite: rounds to bf16 Inf
    0x7F7F8000, 0xFF7F8000,  # the smallest that rounds to bf16 Inf (a tie, odd)
    0x7F7F7FFF, 0xFF7F7FFF,  # the largest that stays finite in bf16
    0x477FF000, 0xC77FF000,  # 65520: the smallest that rounds to fp16 Inf
    0x477FEFFF, 0xC77FEFFF,  # the largest that stays 65504 in fp16
    0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x00400000, 0x007FFFFF, 0x807F8000,  # fp32 subnormals
    0x33000000, 0x33000001, 0x33800000, 0x387FC000,  # fp16 subnormal range and its ties
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even, and next to them
    0x00000000, 0x80000000, 0x3F800000, 0x00800000,  # zeros, 1.0, the smallest normal
]


def _f32(bits) -> torch.Tensor:
    """fp32 tensor of the given bit patterns (ints in 0..2**32-1)."""
    b = torch.as_tensor(bits, dtype=torch.int64)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_cast_exact(out: torch.Tensor, src: torch.Tensor) -> None:
    """``out`` is ``src`` (fp32) cast to out's dtype as torch does it: the
    same bits for every non-NaN value (Inf and overflow included), NaN where
    and only where src is NaN."""
    ref = src.to(out.dtype)
    out, src, ref = out.cpu(), src.cpu(), ref.cpu()
    nan = torch.isnan(src)
    assert torch.equal(torch.isnan(out), nan), (
        f"NaN lost or made at fp32 bits {[hex(int(b) & 0xFFFFFFFF) for b in _bits(src)[torch.isnan(out) != nan]]}")
    bad = (_bits(out) != _bits(ref)) & ~nan
    assert not bad.any(), [(hex(int(s) & 0xFFFFFFFF), hex(int(o) & 0xFFFF), hex(int(r) & 0xFFFF))
                           for s, o, r in zip(_bits(src)[bad], _bits(out)[bad], _bits(ref)[bad])]


def _triton_runs(device: torch.device) -> bool:
    return device.type == "cuda" or _backend.INTERPRET


# --------------------------------------------------------------------------- the cast itself

@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=1.0)
    tl.store(y_ptr + i, cast_rtne(x, y_ptr.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_cast_rtne_keeps_nan_and_inf_and_rounds_like_torch(dtype, device):
    if not _triton_runs(device):
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    # The special patterns, then fresh random bits of every exponent (NaN included).
    rand = torch.randint(0, 2**32, (2000,), dtype=torch.int64)
    src = torch.cat([_f32(SPECIAL_BITS), _f32(rand)]).to(device)
    out = torch.full(src.shape, 7.0, dtype=dtype, device=device)  # poisoned
    _cast_kernel[(triton.cdiv(src.numel(), 1024),)](src, out, src.numel(), BLOCK=1024)
    _assert_cast_exact(out, src)


# --------------------------------------------------------------------------- dequantize kernels

def _special_scales(nblocks: int) -> torch.Tensor:
    """fp32 scales: the special patterns first, then fresh random normal ones."""
    special = _f32(SPECIAL_BITS)
    return torch.cat([special, torch.rand(nblocks - special.numel()) + 0.5])[:nblocks]


@pytest.mark.parametrize("dtype", HALF)
def test_blockwise_8bit_dequantize_keeps_special_scales(dtype, backend, device):
    # dequantize_blockwise_8bit does not read the values of absmax, so every bit
    # pattern reaches the kernel as the scale of one block: code[q] * absmax,
    # then the cast. Codes are random (the 0 code gives 0 * Inf = NaN, as torch).
    blocksize = 32
    absmax = _special_scales(len(SPECIAL_BITS) + 3)
    q = torch.randint(0, 256, (absmax.numel() * blocksize - 5,), dtype=torch.uint8)
    code = dynamic_map(signed=True)
    out = qt.dequantize_blockwise_8bit(q.to(device), absmax.to(device), code.to(device), blocksize, dtype)
    expect = code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]
    _assert_cast_exact(out, expect)


@pytest.mark.parametrize("dtype", HALF)
def test_nf4_dequantize_rounds_extreme_scales_like_torch(dtype, backend, device):
    # Scales that are finite (dequantize_nf4 refuses NaN / Inf ones) but make
    # code * scale overflow bf16 / fp16, or fall into the subnormals.
    w = torch.randn(7, 64 * 7, device=device)
    qw = qt.quantize_nf4(w, blocksize=64, double_quant=False)
    finite = [b for b in SPECIAL_BITS if torch.isfinite(_f32([b])).item() and (b & 0x7FFFFFFF)]
    absmax = torch.cat([_f32(finite).abs(), torch.rand(qw.nblocks) + 0.5])[: qw.nblocks]
    qw = dataclasses.replace(qw, absmax=absmax.to(device))
    before = ops_matmul.launches.copy()
    out = qt.dequantize_nf4(qw, dtype)
    codes = torch.stack([qw.packed.cpu() >> 4, qw.packed.cpu() & 15], 1).reshape(-1).long()
    expect = qw.code.cpu()[codes] * absmax.repeat_interleave(64)
    _assert_cast_exact(out.reshape(-1), expect)
    assert ops_matmul.launches == before  # dequantize_nf4 is no matmul: nothing counted there


# --------------------------------------------------------------------------- matmul kernels

# (M, strategy forced, K, the kernel launch it must count): N = 40 is no tile multiple.
MATMUL_CASES = [
    (1, "gemv", 128, "gemv"),     # the FMA GEMV (aligned K: word decode)
    (5, "gemv", 128, "gemv"),     # the tensor-core GEMV, 2..16 rows
    (3, "gemv", 96, "gemv"),      # the split-K GEMV of the general path (blocks cross rows)
    (17, "fused", 128, "gemm"),   # the word-decoding GEMM
    (9, "fused", 96, "gemm"),     # the general GEMM
    (4, "dequant", 128, "dequantize"),  # dequantize kernel into scratch + torch.matmul
]
N_OUT = 40


def _weight(N: int, K: int, device: torch.device):
    w = torch.randn(N, K)
    qw = qt.quantize_nf4(w.to(device), blocksize=64, double_quant=True)
    return qw, qt.dequantize_nf4(qw, torch.float32).cpu().double()


def _special_rows(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Fresh random rows; row 0 holds a NaN, the last row (if another) +Inf
    and -Inf in two columns, one of each row's specials in the last column."""
    x = torch.randn(M, K)
    x[0, 3] = float("nan")
    if M > 1:
        x[M - 1, 5], x[M - 1, K - 1] = float("inf"), float("-inf")
    else:
        x[0, K - 1] = float("inf")
    return x.to(dtype)


def _assert_propagates(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN exactly where the float64 reference has NaN, the same signed Inf
    where it has Inf, and the rest within the dtype's tolerance."""
    y = y.cpu().double()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "a NaN was lost (or made)"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(y), inf) and torch.equal(y[inf], ref[inf]), "an Inf was lost"
    rows = torch.isfinite(ref).all(1)
    assert rows.sum() > 0 or ref.shape[0] == 1
    if rows.any():
        err = float((y[rows] - ref[rows]).norm() / ref[rows].norm())
        assert err <= TOL[dtype], err


def _check_ran(before: collections.Counter, kernel: str, backend: str) -> None:
    """The Triton leg launched exactly ``kernel``, once; the torch leg none."""
    ran = ops_matmul.launches - before
    if backend == "triton":
        assert ran == {kernel: 1}, ran
    else:
        assert not ran, ran


@pytest.mark.parametrize("M,strategy,K,kernel", MATMUL_CASES,
                         ids=[f"M{c[0]}-{c[1]}-K{c[2]}" for c in MATMUL_CASES])
@pytest.mark.parametrize("dtype", HALF)
def test_nan_and_inf_in_x_propagate_through_the_forward(M, strategy, K, kernel, dtype, backend, device):
    qw, w64 = _weight(N_OUT, K, device)
    x = _special_rows(M, K, dtype)
    ref = x.double() @ w64.t()
    before = ops_matmul.launches.copy()
    with qt.force_strategy(strategy):
        y = qt.nf4_matmul(x.to(device), qw)
    _check_ran(before, kernel, backend)
    assert y.dtype == dtype
    _assert_propagates(y, ref, dtype)


GRAD_CASES = [
    (1, "gemv", 128, "grad_input"),   # "gemv" runs the fused grad-input kernel (words)
    (6, "fused", 96, "grad_input"),   # the general grad-input kernel
    (4, "dequant", 128, "dequantize"),
]


@pytest.mark.parametrize("M,strategy,N,kernel", GRAD_CASES,
                         ids=[f"M{c[0]}-{c[1]}-N{c[2]}" for c in GRAD_CASES])
@pytest.mark.parametrize("dtype", HALF)
def test_nan_and_inf_in_grad_y_propagate_through_grad_input(M, strategy, N, kernel, dtype, backend, device):
    K = 128 if N == 128 else 96
    qw, w64 = _weight(N, K, device)
    gy = _special_rows(M, N, dtype)
    ref = gy.double() @ w64
    before = ops_matmul.launches.copy()
    with qt.force_strategy(strategy):
        gx = qt.nf4_matmul_grad_input(gy.to(device), qw)
    _check_ran(before, kernel, backend)
    _assert_propagates(gx, ref, dtype)


@pytest.mark.parametrize("M,strategy,K,kernel", [MATMUL_CASES[i] for i in (0, 1, 2, 3, 5)],
                         ids=[f"M{MATMUL_CASES[i][0]}-{MATMUL_CASES[i][1]}-K{MATMUL_CASES[i][2]}"
                              for i in (0, 1, 2, 3, 5)])
def test_a_gpu_nan_scale_stays_nan_in_bf16(M, strategy, K, kernel, backend, device):
    # A hand-built weight whose block 1 has the GPU's canonical NaN as its scale
    # (nf4_matmul does not read scale values: the hot path). The payload
    # survives the multiply on the interpreter too, so this reaches the cast
    # with 0x7FFFFFFF on every backend: every output that reads block 1 is NaN.
    w = torch.randn(N_OUT, K, device=device)
    qw = qt.quantize_nf4(w, blocksize=64, double_quant=False)
    absmax = qw.absmax.clone()
    absmax[1] = _f32([0x7FFFFFFF])[0].to(device)
    qw = dataclasses.replace(qw, absmax=absmax)
    flat = torch.zeros(N_OUT * K, dtype=torch.bool)
    flat[64:128] = True  # the elements of block 1
    touched = flat.reshape(N_OUT, K).any(1)
    x = torch.randn(M, K).to(torch.bfloat16)
    before = ops_matmul.launches.copy()
    with qt.force_strategy(strategy):
        y = qt.nf4_matmul(x.to(device), qw).cpu()
    _check_ran(before, kernel, backend)
    assert torch.isnan(y[:, touched]).all(), "a NaN scale came out as a number"
    assert torch.isfinite(y[:, ~touched]).all()


# --------------------------------------------------------------------------- the optimizer step

def _nonfinite_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "PagedAdamW8bit" in str(w.message)]


def _steps(opt, p, grads, device) -> list:
    """Run one step per gradient; the PagedAdamW8bit warnings they gave (a CUDA
    flag is read by the step after its copy is done: synchronize between)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for g in grads:
            p.grad = g.to(p.dtype).to(device)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    return _nonfinite_warnings(record)


@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit"])
@pytest.mark.parametrize("dtype", HALF)
def test_a_nan_gradient_gives_a_nan_parameter_element(cls, dtype, backend, device):
    # bf16 / fp16 parameters: the kernel updates in fp32 and casts back by hand.
    n, i, j = 700, 300, 517
    p = torch.nn.Parameter(torch.randn(n).to(dtype).to(device))
    extra = {"min_8bit_size": 0} if cls == "PagedAdamW8bit" else {}
    opt = getattr(qt, cls)([p], lr=1e-2, paged=False, **extra)
    g = torch.randn(n)
    g[i], g[j] = float("nan"), float("inf")
    _steps(opt, p, [g], device)
    out = p.detach().cpu()
    bad = torch.zeros(n, dtype=torch.bool)
    bad[i] = bad[j] = True
    assert torch.isnan(out[bad]).all(), f"the parameter of a NaN / Inf gradient became {out[bad].tolist()}"
    assert torch.isfinite(out[~bad]).all()


def test_paged_adamw8bit_warns_once_when_it_zeroes_moments(backend, device):
    n = 600
    p = torch.nn.Parameter(torch.randn(n, device=device))
    small = torch.nn.Parameter(torch.randn(10, device=device))  # fp32 moments: NaN kept, no warning
    opt = qt.PagedAdamW8bit([p, small], lr=1e-3, paged=False, min_8bit_size=100)
    small.grad = torch.full((10,), float("nan"), device=device)
    assert _steps(opt, p, [torch.randn(n), torch.randn(n)], device) == []
    assert torch.isnan(opt.state[small]["exp_avg"]).all()  # as torch.optim.AdamW
    bad = torch.randn(n)
    bad[123] = float("nan")
    huge = torch.randn(n)
    huge[7] = 3e37  # finite, but its second moment overflows fp32: v is stored as 0
    first = _steps(opt, p, [bad, torch.randn(n)], device)
    assert len(first) == 1, [str(w.message) for w in first]
    assert "stored as 0" in str(first[0].message)
    # Once per optimizer: a later NaN or overflow says nothing more.
    assert _steps(opt, p, [bad, huge, torch.randn(n)], device) == []
    # Another optimizer warns again, on the overflow alone.
    q = torch.nn.Parameter(torch.randn(n, device=device))
    opt2 = qt.PagedAdamW8bit([q], lr=1e-3, paged=False, min_8bit_size=0)
    said = _steps(opt2, q, [huge], device)
    assert float(opt2.dequantized_moments(q)[1][7]) == 0.0 and bool(torch.isfinite(q).all())
    assert len(said + _steps(opt2, q, [torch.randn(n)], device)) == 1
