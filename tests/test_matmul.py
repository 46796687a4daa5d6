"""nf4_matmul / nf4_matmul_grad_input: the fused kernels (GEMM, split-K GEMV,
grad-input) against the reference of docs/testing.md (dequantize in fp32, multiply in
float64), autograd, the torch.library registration and bad input."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import qlora_triton as qt
from qlora_triton import backend as _backend
from qlora_triton import reference
from qlora_triton.library import weight_args
from qlora_triton.ops import matmul as ops_matmul
from qlora_triton.ops import tuned_sm90
from qlora_triton.strategy import select_strategy

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
MS = [0, 1, 3, 17, 64, 130]
# (N, K, blocksize): N never a multiple of a tile.
SHAPES = [
    (100, 384, 128),  # K % blocksize == 0: the aligned fast path (one scale per row)
    (77, 200, 64),    # K not a multiple of the blocksize: blocks cross rows
    (75, 131, 32),    # odd K and odd N * K: a padding nibble at the end
    (66, 96, 32),     # aligned, blocksize 32: the word kernels' 32-column K tile
]
# x layouts: leading batch dims, and two non-contiguous views.
LAYOUTS = ["2d", "batched", "strided", "transposed"]

# A sub-grid of the full product: every (M, dtype, double quant) once, with
# shape, bias and layout cycling at different rates so that each kernel (GEMV:
# M <= 16, GEMM: larger) sees every shape with and without double quant, and
# most shapes with and without bias, in several layouts.
CASES = [
    (M, dtype, SHAPES[(i // 2) % 4], dq, (i // 2 + i // 8) % 2 == 0, LAYOUTS[(i // 2 + i // 5) % 4])
    for i, (M, dtype, dq) in enumerate(itertools.product(MS, DTYPES, [False, True]))
]


# The GPU subset: M = 0 (no launch, an empty result) in every dtype.
CASES = [pytest.param(c, marks=pytest.mark.gpu) if c[0] == 0 else c for c in CASES]


def _case_id(case):
    M, dtype, (N, K, bs), dq, bias, layout = case
    return f"M{M}-{str(dtype)[6:]}-{N}x{K}-bs{bs}-{'dq' if dq else 'fp32absmax'}-{'bias' if bias else 'nobias'}-{layout}"


def _make_input(rows: int, features: int, dtype: torch.dtype, layout: str,
                device: torch.device) -> torch.Tensor:
    """A fresh random input of ``rows`` rows (``batched``: [2, rows, features])
    in ``layout``."""
    if layout == "2d":
        return torch.randn(rows, features).to(dtype).to(device)
    if layout == "batched":
        return torch.randn(2, rows, features).to(dtype).to(device)
    if layout == "strided":  # stride 2 along the feature dim
        return torch.randn(rows, 2 * features).to(dtype).to(device)[:, ::2]
    if layout == "transposed":  # column-major
        return torch.randn(features, rows).to(dtype).to(device).t()
    raise AssertionError(layout)


def _weight(N: int, K: int, blocksize: int, double_quant: bool, device="cpu") -> qt.NF4Weight:
    # Rows of very different scale, so a wrong scale index shows up.
    w = torch.randn(N, K) * torch.rand(N, 1).pow(3).add(0.05)
    return qt.quantize_nf4(w.to(device), blocksize=blocksize, double_quant=double_quant)


def _dense(qw: qt.NF4Weight) -> torch.Tensor:
    """The reference weight: dequantized in fp32, as float64 on the CPU."""
    return reference.nf4_dequantize(qw, torch.float32).double().cpu()


def _poison_allocator() -> None:
    # Free a NaN-filled block so that the op's output buffer likely reuses it:
    # an element the kernel forgets to write then fails the NaN check.
    torch.full((1 << 18,), float("nan")).sum()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.cpu()
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output"
    if ref.numel() == 0:
        return
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(backend, device, case):
    M, dtype, (N, K, bs), dq, has_bias, layout = case
    qw = _weight(N, K, bs, dq, device)
    x = _make_input(M, K, dtype, layout, device)
    bias = torch.randn(N).to(dtype).to(device) if has_bias else None
    ref = x.cpu().double() @ _dense(qw).t()
    if has_bias:
        ref = ref + bias.cpu().double()
    _poison_allocator()
    y = qt.nf4_matmul(x, qw, bias)
    assert y.shape == (*x.shape[:-1], N)
    _assert_close(y, ref, dtype)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grad_input_matches_reference(backend, device, case):
    M, dtype, (N, K, bs), dq, _, layout = case
    qw = _weight(N, K, bs, dq, device)
    grad_y = _make_input(M, N, dtype, layout, device)
    ref = grad_y.cpu().double() @ _dense(qw)
    _poison_allocator()
    gx = qt.nf4_matmul_grad_input(grad_y, qw)
    assert gx.shape == (*grad_y.shape[:-1], K)
    _assert_close(gx, ref, dtype)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("M", [3, 40])
def test_non_contiguous_equals_contiguous_copy(backend, device, M, layout):
    qw = _weight(70, 200, 64, True, device)
    x = _make_input(M, 200, torch.float16, layout, device)
    assert not x.is_contiguous()
    y, y_contig = qt.nf4_matmul(x, qw), qt.nf4_matmul(x.contiguous(), qw)
    torch.testing.assert_close(y, y_contig, rtol=1e-3, atol=1e-4)
    if backend == "triton" and device.type == "cpu":
        # Interpreted: same tiles, same order of accumulation. (On the GPU the
        # split-K GEMV adds partial sums with atomics, in no fixed order.)
        assert torch.equal(y, y_contig)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [0, 3, 130])
def test_autograd_matches_reference(backend, device, M, dtype):
    N, K = 90, 200
    qw = _weight(N, K, 64, True, device)
    x = torch.randn(2, M, K).to(dtype).to(device).requires_grad_()
    bias = torch.randn(N).to(dtype).to(device).requires_grad_()
    probe = torch.randn(2, M, N, dtype=torch.float64)  # a dense, random grad_y

    y = qt.nf4_matmul(x, qw, bias)
    (y.double() * probe.to(device)).sum().backward()

    x_ref = x.detach().cpu().double().requires_grad_()
    b_ref = bias.detach().cpu().double().requires_grad_()
    ((x_ref @ _dense(qw).t() + b_ref) * probe).sum().backward()
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    _assert_close(x.grad, x_ref.grad, dtype)
    if M == 0:
        assert torch.equal(bias.grad.cpu(), torch.zeros(N, dtype=dtype))
    else:
        _assert_close(bias.grad, b_ref.grad, dtype)


def test_backward_of_sum_with_expanded_grad(backend, device):
    # y.sum() hands backward an expanded (stride 0) grad_y.
    qw = _weight(70, 131, 32, False, device)
    x = torch.randn(20, 131, device=device, requires_grad=True)
    qt.nf4_matmul(x, qw).sum().backward()
    _assert_close(x.grad, torch.ones(20, 70, dtype=torch.float64) @ _dense(qw), torch.float32)


def test_weight_is_frozen():
    qw = _weight(30, 64, 64, False)
    qw.absmax.requires_grad_()
    with pytest.raises(ValueError, match="qw.absmax requires grad.*frozen"):
        qt.nf4_matmul(torch.randn(3, 64), qw)


# -- the decode GEMVs (M <= 16) -----------------------------------------------------
# (N, K, blocksize): the word GEMVs' aligned path (K % blocksize == 0; FMA for
# M = 1, tensor cores for 2..16) with N not a multiple of the row tile and K not
# a multiple of the K tile or of the split, then a general-path shape
# (K % blocksize != 0) that takes the split-K tensor-core GEMV.
GEMV_SHAPES = [(45, 96, 32), (130, 320, 64), (77, 256, 128), (40, 200, 64)]
GEMV_CASES = [(M, dtype, GEMV_SHAPES[(M + i) % 4], (M + i) % 2 == 0, LAYOUTS[(M + 2 * i) % 4])
              for M in (1, 2, 3, 4, 5, 16) for i, dtype in enumerate(DTYPES)]
# The GPU subset: the FMA GEMV (M = 1) and the largest tensor-core one (M = 16).
GEMV_CASES = [pytest.param(c, marks=pytest.mark.gpu) if c[0] in (1, 16) else c for c in GEMV_CASES]


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"M{c[0]}-{str(c[1])[6:]}-{c[2][0]}x{c[2][1]}-bs{c[2][2]}-{'bias' if c[3] else 'nobias'}-{c[4]}")
def test_gemv_matches_reference(backend, device, case):
    M, dtype, (N, K, bs), has_bias, layout = case
    qw = _weight(N, K, bs, (M + N) % 2 == 0, device)
    x = _make_input(M, K, dtype, layout, device)
    bias = torch.randn(N).to(dtype).to(device) if has_bias else None
    ref = x.cpu().double() @ _dense(qw).t()
    if has_bias:
        ref = ref + bias.cpu().double()
    _poison_allocator()
    with qt.force_backend(backend):
        before = ops_matmul.launches.copy()
        y = qt.nf4_matmul(x, qw, bias)
        ran = ops_matmul.launches - before
    assert y.shape == (*x.shape[:-1], N)
    _assert_close(y, ref, dtype)
    if backend == "triton":
        # One launch (the interpreter's configs split K in two, so the split
        # epilogue ran), and every split counter is back at zero for the next.
        # fp32 x through a weight whose blocks cross rows, under torch's default
        # "highest" fp32 precision, runs "dequant" (ops/matmul._full_fp32).
        full_fp32 = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        assert ran == ({"dequantize": 1} if full_fp32 and K % bs else {"gemv": 1})
        assert (ops_matmul._packed_words(qw) is not None) == (K % bs == 0)
        assert all(int(c.abs().sum()) == 0 for c in ops_matmul._split_counters.values())


# The FMA GEMV (M = 1) reads 256 columns per trip, and the interpreter's config
# splits K in 2. Partial trips (the masked loop): K = 64, 192, 320 leave 1-3 of
# a trip's 4 blocks (64) or 2-6 of 8 (32); the second split gets no trip (K =
# 64, 192) or a partial one (320). Whole trips (EVEN_K: no masks; rows past N
# read row N - 1, the prefetch past a split's end re-reads its last trip): 2 +
# 1 trips (768) or 2 + 2 (1024), blocks of 32 (8 per trip), 64 and 512 (wider
# than a trip). N not a multiple of the tile's rows, with and without double
# quantization, each x dtype, strided x, a bias.
@pytest.mark.parametrize("K, bs, dq", [(64, 64, True), (192, 64, False), (320, 64, True),
                                       (192, 32, False), (320, 32, True), (64, 32, True),
                                       (576, 64, True), (768, 64, True), (1024, 32, False),
                                       (1024, 512, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_fma_gemv_trips(backend, device, K, bs, dq, dtype):
    N = 45
    qw = _weight(N, K, bs, dq, device)
    x = _make_input(1, K, dtype, "strided", device)
    bias = torch.randn(N).to(dtype).to(device)
    ref = x.cpu().double() @ _dense(qw).t() + bias.cpu().double()
    _poison_allocator()
    with qt.force_backend(backend):
        before = ops_matmul.launches.copy()
        y = qt.nf4_matmul(x, qw, bias)
        ran = ops_matmul.launches - before
    _assert_close(y, ref, dtype)
    if backend == "triton":
        assert ran == {"gemv": 1}
        assert all(int(c.abs().sum()) == 0 for c in ops_matmul._split_counters.values())


# The tensor-core GEMV (M = 2..16) reads K in the wgmma A fragment's order (a
# lane's 32-column runs, x^T permuted the same way; ops/gemv.py): each of its K
# tiles (128 and 256 columns) with K leaving a partial trip (a run all in or
# all out), no trip for the second split (K = 96 at 256), blocksizes 32 (two
# scales per lane and row at 256), 64 and 128 (a block across lanes), N not a
# multiple of the 64-row tile, rows of x from 2 to 16, a bias, and the folded
# LoRA update on the rows and columns the permutation must not mix up.
@pytest.mark.parametrize("block_k", [128, 256])
@pytest.mark.parametrize("M, K, bs, dtype", [(2, 96, 32, torch.bfloat16), (5, 320, 64, torch.float16),
                                             (16, 384, 128, torch.bfloat16),
                                             (7, 640, 32, torch.float32)],
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else str(v))
def test_dot_gemv_fragment_order(monkeypatch, device, block_k, M, K, bs, dtype):
    if not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    import triton

    from qlora_triton.ops import gemv as gemv_mod

    cfg = triton.Config({"BLOCK_N": 64, "BLOCK_K": block_k, "SPLIT_K": 2}, num_warps=4, num_stages=1)
    monkeypatch.setattr(gemv_mod, "gemv_config", lambda *a, **k: cfg)
    N, r = 70, 5
    qw = _weight(N, K, bs, K % 64 == 0, device)
    x = torch.randn(M, K).to(dtype).to(device)
    bias = torch.randn(N).to(dtype).to(device)
    h = torch.randn(M, r).to(dtype).to(device)
    lora_b = torch.randn(N, r).to(dtype).to(device)
    base = x.cpu().double() @ _dense(qw).t() + bias.cpu().double()
    lora = 0.5 * h.cpu().double() @ lora_b.cpu().double().t()
    with qt.force_backend("triton"):
        before = ops_matmul.launches.copy()
        y = ops_matmul.nf4_matmul(x, qw, bias)
        y_lora = ops_matmul.nf4_lora_matmul(x, qw, bias, h, lora_b, 0.5)
        ran = ops_matmul.launches - before
    assert ran == {"gemv": 2}
    _assert_close(y, base, dtype)
    _assert_close(y_lora, base + lora, dtype)
    assert all(int(c.abs().sum()) == 0 for c in ops_matmul._split_counters.values())


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in an offset, strided view (every other element of a
    buffer twice as large), or for a 0-d tensor an expanded view."""
    if t.dim() == 0:
        return t.reshape(1).expand(1)[0]
    buf = torch.full((2 * t.numel(),), 0, dtype=t.dtype, device=t.device)
    view = buf[1::2]
    view.copy_(t.reshape(-1))
    assert view.storage_offset() == 1 and (view.stride(0) == 2 or view.numel() == 1)
    return view


@pytest.mark.parametrize("M", [1, 3, 9, 40])
def test_strided_weight_fields_and_bias_equal_contiguous_copies(device, M):
    if not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    qw = _weight(70, 128, 64, True, device)
    strided = dataclasses.replace(qw, **{n: _strided_copy(t) for n, t in qw.tensors().items()})
    bias = _strided_copy(torch.randn(70, device=device))
    x = torch.randn(M, 128, device=device).bfloat16()
    g = torch.randn(M, 70, device=device).bfloat16()
    with qt.force_backend("triton"):
        y, y_ref = qt.nf4_matmul(x, strided, bias), qt.nf4_matmul(x, qw, bias.contiguous())
        gx, gx_ref = qt.nf4_matmul_grad_input(g, strided), qt.nf4_matmul_grad_input(g, qw)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


# -- the dispatcher ---------------------------------------------------------------
def test_select_strategy_by_rows_on_the_cpu():
    cpu = torch.device("cpu")
    pick = lambda m: select_strategy(m, 4096, 4096, torch.bfloat16, cpu)  # noqa: E731
    assert [pick(m) for m in (1, 2, 8, 16)] == ["gemv"] * 4
    assert [pick(m) for m in (17, 64, 4096)] == ["fused"] * 3


# -- the config table (pure functions, checked here on the CPU) -------------------
def _tile(cfg) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"


@pytest.mark.parametrize("op", ["forward", "grad_input", "gemv"])
def test_general_path_configs_come_from_the_measured_tiles(op):
    # The per-element decode's shipped config is one of its autotune candidates
    # (the tiles sm90_compile measured to fit without spilling); the GEMV
    # splits K only while the grid is short and every split keeps >= 512 columns.
    candidates = {(_tile(c), c.kwargs.get("SPLIT_K")) for c in tuned_sm90.general_configs(op)}
    for N, K in [(4096, 4104), (96, 70), (50, 8200), (28672, 8200)]:
        cfg = tuned_sm90.general_config(op, N, K)
        assert (_tile(cfg), cfg.kwargs.get("SPLIT_K")) in candidates, (N, K, _tile(cfg))
        if op == "gemv":
            split = cfg.kwargs["SPLIT_K"]
            assert split == 1 or K // split >= 512, (N, K, split)
            programs = -(-N // cfg.kwargs["BLOCK_N"]) * split
            assert split == 1 or programs // 2 < 256, (N, K, split)


@pytest.mark.parametrize("kernel", ["fma", "dot"])
def test_gemv_config_fills_the_grid_and_respects_the_blocksize(kernel):
    for N, K, bs in [(4096, 4096, 64), (1024, 4096, 64), (28672, 8192, 64), (8192, 28672, 32),
                     (96, 64, 32)]:
        cfg = tuned_sm90.gemv_config(kernel, N, K, bs)
        assert tuned_sm90.allowed(cfg, bs, False, kernel)
        # The tensor-core kernel's K tile is 128 or 256 columns whatever the
        # blocksize (a scale per 32-column run, ops/gemv.py).
        assert kernel == "fma" or cfg.kwargs["BLOCK_K"] in (128, 256)
        # Every split gets at least one K tile (the last one may be partial).
        assert cfg.kwargs["SPLIT_K"] <= -(-K // cfg.kwargs["BLOCK_K"]), (N, K, _tile_gemv(cfg))


def _tile_gemv(cfg) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} split {kw['SPLIT_K']}"


@pytest.mark.parametrize("K, bs", [(96, 32), (70, 32)])
def test_word_aligned_weights_never_reach_the_per_element_kernels(monkeypatch, device, K, bs):
    # The general kernels have no aligned branch: K % blocksize == 0 always takes
    # the word kernels (ops/matmul._packed_words is None exactly otherwise).
    if not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    import qlora_triton.ops.matmul as dispatch

    ran = []
    for name in ("gemv_words", "gemv_general", "gemm_words", "gemm_general", "grad_input_words",
                 "grad_input_general"):
        monkeypatch.setattr(dispatch, name, lambda *a, _n=name, **k: ran.append(_n) or None)
    qw = _weight(40, K, bs, True, device)
    with qt.force_backend("triton"):
        for rows in (1, 3, 20):
            # bf16: fp32 through per-element weights may run "dequant" instead.
            ops_matmul.nf4_matmul(torch.randn(rows, K, device=device).bfloat16(), qw)
            ops_matmul.nf4_matmul_grad_input(torch.randn(rows, 40, device=device).bfloat16(), qw)
    words = K % bs == 0
    assert all(name.endswith("_words") == words for name in ran), ran
    assert sorted(set(ran)) == sorted(f"{f}_{'words' if words else 'general'}"
                                      for f in ("gemv", "gemm", "grad_input"))


@pytest.mark.parametrize("setting, fp32_precision", [("highest", "ieee"), ("high", "tf32"),
                                                      ("medium", "tf32")])
def test_launchers_follow_torchs_fp32_matmul_precision(monkeypatch, setting, fp32_precision):
    # Every tl.dot launcher passes DOT_PRECISION from torch's fp32 setting:
    # ieee under "highest" (torch's default), tf32 otherwise; 16-bit x always tf32.
    # Under "highest", fp32 x through a weight whose blocks cross rows runs
    # "dequant" (torch's own fp32 matmul) instead of a per-element kernel.
    from qlora_triton.ops import gemm, gemv, grad_input, launch

    seen = []
    for mod in (gemm, gemv, grad_input):
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, args, const, cfg, *a, **k:
                            seen.append((kernel.__name__, const.get("DOT_PRECISION"))))
    dequant = []
    for name in ("dequant_matmul", "dequant_grad_input"):
        monkeypatch.setattr(ops_matmul, name, lambda *a, _n=name: dequant.append(_n))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert torch.backends.cuda.matmul.allow_tf32 == (setting != "highest")
        for dtype, want in ((torch.float32, fp32_precision), (torch.bfloat16, "tf32")):
            assert launch.dot_precision(dtype) == want
            seen.clear()
            for K, bs in ((96, 32), (70, 32)):  # word kernels, per-element kernels
                qw = _weight(40, K, bs, True, torch.device("cpu"))
                for rows in (3, 20):
                    ops_matmul.nf4_matmul(torch.randn(rows, K).to(dtype), qw)
                    ops_matmul.nf4_matmul_grad_input(torch.randn(rows, 40).to(dtype), qw)
            dots = {name: p for name, p in seen if "fma" not in name}
            general = dtype == torch.float32 and setting == "highest"
            assert len(dots) == (3 if general else 6) and set(dots.values()) == {want}, seen
            assert all("words" in name or "dot" in name for name in dots) or not general, seen
            assert len(dequant) == (4 if general else 0), dequant
            dequant.clear()
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("rows, strategy, kernels", [
    (1, None, {"gemv": 1, "grad_input": 1}), (16, None, {"gemv": 1, "grad_input": 1}),
    (17, None, {"gemm": 1, "grad_input": 1}), (100, None, {"gemm": 1, "grad_input": 1}),
    (3, "fused", {"gemm": 1, "grad_input": 1}), (3, "dequant", {"dequantize": 2}),
])
def test_dispatcher_runs_the_chosen_kernel(device, rows, strategy, kernels):
    if not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    qw = _weight(40, 96, 32, True, device)
    x = torch.randn(rows, 96, device=device, requires_grad=True)
    with qt.force_backend("triton"), qt.force_strategy(strategy):
        before = ops_matmul.launches.copy()
        qt.nf4_matmul(x, qw).sum().backward()
        ran = ops_matmul.launches - before
    assert ran == kernels


# -- torch.library ----------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck(backend, device, double_quant):
    qw = _weight(50, 131, 32, double_quant, device)
    for rows in (3, 20):  # GEMV and GEMM
        x = torch.randn(2, rows, 131, device=device)
        torch.library.opcheck(torch.ops.qlora_triton.nf4_matmul.default,
                              (x, *weight_args(qw)[:6], torch.randn(50, device=device), *weight_args(qw)[6:]))
        torch.library.opcheck(torch.ops.qlora_triton.nf4_matmul.default,
                              (x.half(), *weight_args(qw)[:6], None, *weight_args(qw)[6:]))
        torch.library.opcheck(torch.ops.qlora_triton.nf4_matmul_grad_input.default,
                              (torch.randn(rows, 50, device=device).bfloat16(), *weight_args(qw)))


@pytest.mark.parametrize("k", [128, 131])  # word-aligned: the LoRA folded into the GEMV; not: base + addmm_
def test_opcheck_lora_matmul(backend, device, k):
    qw = _weight(50, k, 32, True, device)
    r = 6
    for rows in (3, 20):  # folded GEMV (aligned K) and the base product + addmm_
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, rows, k, device=device, dtype=dtype)
            h = torch.randn(2, rows, r, device=device, dtype=dtype)
            lora_b = torch.randn(50, r, device=device, dtype=dtype)
            bias = torch.randn(50, device=device) if dtype == torch.float32 else None
            torch.library.opcheck(torch.ops.qlora_triton.nf4_lora_matmul.default,
                                  (x, *weight_args(qw)[:6], bias, h, lora_b, 0.75, *weight_args(qw)[6:]))


def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    def layer(x, qw, bias):  # NF4Weight (a dataclass) as an argument
        return torch.nn.functional.gelu(qt.nf4_matmul(x, qw, bias))

    # fullgraph=True: any graph break (e.g. dynamo stepping into the launcher) fails.
    compiled = torch.compile(layer, fullgraph=True)
    # A second weight of the same shape must be read, not baked in from the first.
    for qw in (_weight(60, 200, 64, True, device), _weight(60, 200, 64, True, device)):
        x = torch.randn(2, 9, 200, device=device)
        bias = torch.randn(60, device=device)
        probe = torch.randn(2, 9, 60, device=device)
        results = []
        for fn in (layer, compiled):
            xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
            y = fn(xi, qw, bi)
            (y * probe).sum().backward()
            results.append((y.detach(), xi.grad, bi.grad))
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


# -- bad input --------------------------------------------------------------------
# (what, call(x [4, 64] fp32, qw [30, 64]), error, message pattern)
BAD = [
    ("x int", lambda x, qw: qt.nf4_matmul(x.long(), qw), TypeError, "x must be float32"),
    ("x float64", lambda x, qw: qt.nf4_matmul(x.double(), qw), TypeError, "x must be float32"),
    ("x list", lambda x, qw: qt.nf4_matmul(x.tolist(), qw), TypeError, "x must be a torch.Tensor"),
    ("x wrong K", lambda x, qw: qt.nf4_matmul(x[:, :63], qw), ValueError, r"x must have shape \[\.\.\., 64\]"),
    ("x 0-d", lambda x, qw: qt.nf4_matmul(x[0, 0], qw), ValueError, "x must have shape"),
    ("x device", lambda x, qw: qt.nf4_matmul(x.to("meta"), qw), ValueError, "x is on meta but qw is on cpu"),
    ("qw dense", lambda x, qw: qt.nf4_matmul(x, torch.randn(30, 64)), TypeError, "qw must be an NF4Weight"),
    ("qw 1-D", lambda x, qw: qt.nf4_matmul(x, qt.quantize_nf4(torch.randn(64))), ValueError, "qw must be a 2-D"),
    ("bias shape", lambda x, qw: qt.nf4_matmul(x, qw, torch.randn(31)), ValueError, r"bias must have shape \(30,\)"),
    ("bias dtype", lambda x, qw: qt.nf4_matmul(x, qw, torch.ones(30, dtype=torch.int32)), TypeError, "bias must be float32"),
    ("bias type", lambda x, qw: qt.nf4_matmul(x, qw, 1.0), TypeError, "bias must be a torch.Tensor"),
    ("bias device", lambda x, qw: qt.nf4_matmul(x, qw, torch.randn(30, device="meta")), ValueError, "bias is on meta"),
    ("grad_y wrong N", lambda x, qw: qt.nf4_matmul_grad_input(x, qw), ValueError, r"grad_y must have shape \[\.\.\., 30\]"),
    ("grad_y dtype", lambda x, qw: qt.nf4_matmul_grad_input(torch.ones(4, 30, dtype=torch.int8), qw), TypeError, "grad_y must be float32"),
]


@pytest.mark.parametrize("what, call, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(what, call, error, match):
    qw = _weight(30, 64, 64, True)
    with pytest.raises(error, match=match):
        call(torch.randn(4, 64), qw)


def test_int32_row_chunks_split_only_past_the_int32_range():
    from qlora_triton.ops.matmul import _int32_row_chunks

    small = torch.empty(4096, 4096)
    assert _int32_row_chunks(small, 11008) is None
    # Meta tensors stand for huge inputs without memory.
    big = torch.empty(200_000, 4096, device="meta")       # the output would overflow
    big_rows = torch.empty(600_000, 4096, device="meta")  # the input itself would
    assert _int32_row_chunks(big, 11008) == (2**31 - 1) // 11008
    assert _int32_row_chunks(big[:1000], 11008) is None
    assert _int32_row_chunks(big_rows, 16) == (2**31 - 1) // 4096
    rows = _int32_row_chunks(big_rows, 11008)
    assert rows * 11008 < 2**31 and rows * 4096 < 2**31


def test_row_chunked_launches_match_one_launch(backend, device, monkeypatch):
    """The split the launchers make past int32 offsets, run at a small limit."""
    from qlora_triton.ops import matmul as ops_matmul

    qw = qt.quantize_nf4(torch.randn(40, 96, device=device))
    x = torch.randn(70, 96, device=device)
    g = torch.randn(70, 40, device=device)
    bias = torch.randn(40, device=device)
    whole = qt.nf4_matmul(x, qw, bias), qt.nf4_matmul_grad_input(g, qw)
    monkeypatch.setattr(ops_matmul, "INT32_LIMIT", 30 * 96)  # 30 rows per launch
    chunked = qt.nf4_matmul(x, qw, bias), qt.nf4_matmul_grad_input(g, qw)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- LoRA folded into the GEMV ----------------------------------------------------
@pytest.mark.parametrize("M, K, r, dtype", [(1, 128, 8, torch.bfloat16), (3, 96, 20, torch.float32),
                                            (16, 128, 16, torch.float16), (1, 70, 4, torch.bfloat16)])
def test_lora_eval_forward_is_two_launches_at_decode(device, M, K, r, dtype):
    # The eval forward of a LoRA layer at M <= 16: x @ A.T, then the GEMV with
    # scaling * h @ B.T added in its epilogue (fp32): two kernel-launching ops
    # (counted as benchmarks/launches.py counts) where K % blocksize == 0; the
    # same outputs as the unfolded path (base product + addmm) and the fp64
    # reference. K = 70 (blocks cross rows) keeps the unfolded path.
    if not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    from benchmarks.launches import count_launches

    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(K, 90), r=r, lora_alpha=2 * r,
                                          blocksize=32).to(device).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(M, K, device=device).to(dtype)
    with qt.force_backend("triton"), torch.no_grad():
        layer(x)
        with count_launches() as counts:
            y = layer(x)
        A = layer.lora_A.weight.to(dtype)
        B = layer.lora_B.weight.to(dtype)
        h = x @ A.t()
        unfolded = qt.nf4_matmul(x, layer.quant_weight, layer.bias.to(dtype))
        unfolded.addmm_(h, B.t(), alpha=layer.scaling)
    ref = (x.cpu().double() @ _dense(layer.quant_weight).t() + layer.bias.cpu().double()
           + layer.scaling * h.cpu().double() @ B.cpu().double().t())
    _assert_close(y, ref, dtype)
    _assert_close(unfolded, ref, dtype)
    kernels = {k: v for k, v in counts.items() if v}
    if K % 32 == 0:
        assert sum(kernels.values()) <= 2 and kernels.get("aten.mm") == 1, kernels
    else:
        assert "aten.addmm_" in kernels, kernels
