"""Nothing silently wrong (docs/bad-input.md): strides of every tensor honoured,
NaN and overflow reported, malformed states refused with errors that name the
argument, key or file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qlora_triton as qt


def _qw(shape=(40, 96), double_quant=True, dtype=torch.float32, blocksize=64, device=None):
    return qt.quantize_nf4(torch.randn(shape, device=device).to(dtype), blocksize=blocksize,
                           double_quant=double_quant)


def _strided(t: torch.Tensor, step: int = 3) -> torch.Tensor:
    """A copy of ``t`` (same values) as a strided view into a larger buffer
    filled with junk, so that reading it as contiguous gives other values."""
    flat = t.reshape(-1)
    big = torch.full((flat.numel() * step + 1,), 77, dtype=t.dtype, device=t.device) if not t.is_floating_point() \
        else torch.randn(flat.numel() * step + 1, device=t.device).to(t.dtype) * 1e3
    view = big[1::step][: flat.numel()]
    view.copy_(flat)
    assert not view.is_contiguous() or flat.numel() == 1
    return view.reshape(t.shape) if t.dim() else view.reshape(())


def _offset_view(t: torch.Tensor, offset: int = 5) -> torch.Tensor:
    big = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    big[offset:] = t.reshape(-1)
    return big[offset:].reshape(t.shape)


# ---- 1. strides of every NF4Weight field ----------------------------------------------

FIELDS = [(False, f) for f in ("packed", "absmax", "code")] + \
    [(True, f) for f in ("packed", "absmax", "code", "absmax2", "code2", "offset")]


@pytest.mark.parametrize("double_quant, field", FIELDS, ids=[f"{f}-{'nested' if d else 'plain'}" for d, f in FIELDS])
@pytest.mark.parametrize("view", ["strided", "offset"])
def test_weight_fields_of_any_stride(backend, device, double_quant, field, view):
    qw = _qw(double_quant=double_quant, device=device)
    make = _strided if view == "strided" else _offset_view
    odd = dataclasses.replace(qw, **{field: make(getattr(qw, field))})
    assert torch.equal(qt.dequantize_nf4(odd), qt.dequantize_nf4(qw))
    for M in (5, 33):  # the GEMV and the GEMM kernels
        x, gy = torch.randn(M, 96, device=device), torch.randn(M, 40, device=device)
        assert torch.equal(qt.nf4_matmul(x, odd), qt.nf4_matmul(x, qw))
        assert torch.equal(qt.nf4_matmul_grad_input(gy, odd), qt.nf4_matmul_grad_input(gy, qw))


def test_expanded_fields(backend, device):
    # Stride-0 views: a constant codebook and a constant nested scale.
    qw = _qw(double_quant=True, device=device)
    code = torch.full((1,), 0.5, device=device).expand(16)
    absmax2 = qw.absmax2[:1].expand(qw.absmax2.numel())
    odd = dataclasses.replace(qw, code=code, absmax2=absmax2)
    dense = dataclasses.replace(qw, code=code.contiguous(), absmax2=absmax2.contiguous())
    x = torch.randn(3, 96, device=device)
    assert torch.equal(qt.dequantize_nf4(odd), qt.dequantize_nf4(dense))
    assert torch.equal(qt.nf4_matmul(x, odd), qt.nf4_matmul(x, dense))


def test_contiguous_fields_are_not_copied():
    # Module buffers must keep aliasing the weight's tensors.
    qw = _qw()
    again = dataclasses.replace(qw)
    assert all(getattr(again, n).data_ptr() == t.data_ptr() for n, t in qw.tensors().items())


@pytest.mark.parametrize("bias", ["strided", "expanded"])
@pytest.mark.parametrize("M", [3, 40])  # the GEMV and the GEMM kernels
def test_bias_of_any_stride(backend, device, bias, M):
    # Needs the matmul launchers to honour the bias stride (ops/matmul.py).
    qw = _qw((24, 64), double_quant=False, device=device)
    b = torch.randn(48, device=device)[::2] if bias == "strided" else torch.randn(1, device=device).expand(24)
    x = torch.randn(M, 64, device=device)
    assert torch.equal(qt.nf4_matmul(x, qw, b), qt.nf4_matmul(x, qw, b.contiguous()))


# ---- 2. the 8-bit blockwise helpers ------------------------------------------------------

def test_blockwise_8bit_strided_inputs(backend, device):
    code = qt.dynamic_map().to(device)
    x = torch.randn(700, 3, device=device)[:, 1]
    q, absmax = qt.quantize_blockwise_8bit(x, code, 128)
    q2, absmax2 = qt.quantize_blockwise_8bit(x.contiguous(), code, 128)
    assert torch.equal(q, q2) and torch.equal(absmax, absmax2)
    back = qt.dequantize_blockwise_8bit(_strided(q), _strided(absmax), _strided(code), 128)
    assert torch.equal(back, qt.dequantize_blockwise_8bit(q, absmax, code, 128))


def test_blockwise_8bit_bad_arguments():
    code = qt.dynamic_map()
    x = torch.randn(300)
    q, absmax = qt.quantize_blockwise_8bit(x, code)
    cases = [
        (lambda: qt.quantize_blockwise_8bit(x, code[:255]), "code"),
        (lambda: qt.quantize_blockwise_8bit(x, code.flip(0)), "sorted"),
        (lambda: qt.quantize_blockwise_8bit(x, code.double()), "code"),
        (lambda: qt.quantize_blockwise_8bit(x, code, 0), "blocksize"),
        (lambda: qt.quantize_blockwise_8bit(x, code, 100), "blocksize"),
        (lambda: qt.quantize_blockwise_8bit(x.to(torch.int32), code), "x"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax[:1], code), "absmax"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax.double(), code), "absmax"),
        (lambda: qt.dequantize_blockwise_8bit(q.to(torch.int16), absmax, code), "q"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax, code[:16]), "code"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax, code.flip(0)), "sorted"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax, code, 0), "blocksize"),
        (lambda: qt.dequantize_blockwise_8bit(q, absmax, code, dtype=torch.int8), "dtype"),
    ]
    for call, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_blockwise_8bit_refuses_non_finite_on_both_backends(backend, device, bad):
    x = torch.randn(300, device=device)
    x[17] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        qt.quantize_blockwise_8bit(x, qt.dynamic_map())


# ---- 5. overflow in double quantization ----------------------------------------------------

@pytest.mark.parametrize("case", ["full-1e38", "outliers-3e38", "full-max"])
def test_huge_weights_double_quantize_or_refuse(backend, device, case):
    if case == "full-1e38":
        w = torch.full((4, 64), 1e38, device=device)
    elif case == "full-max":
        w = torch.full((3, 64), torch.finfo(torch.float32).max, device=device)
    else:
        w = torch.randn(64, 64, device=device)
        w[3, 5], w[40, 7] = 3e38, -3e38
    plain = qt.dequantize_nf4(qt.quantize_nf4(w, double_quant=False))
    try:
        qw = qt.quantize_nf4(w, double_quant=True)
    except ValueError as e:  # allowed: a clear refusal
        assert "overflow" in str(e) and "double_quant=False" in str(e)
        return
    out = qt.dequantize_nf4(qw)
    assert bool(out.isfinite().all())
    assert torch.isfinite(qw.offset)
    # Huge blocks keep their plain NF4 value up to the 8-bit rounding of the scale.
    big = w.abs() > 1e30
    assert torch.allclose(out[big], plain[big], rtol=0.02)


def test_double_quant_result_is_checked(backend, device):
    # Scales up to fp32's maximum: the nested decode dyn * absmax2 + offset
    # rounds above it for one block. quantize_nf4 says so instead of returning
    # a weight that dequantizes to Inf.
    w = torch.randn(44, 64, device=device) * 1e-3
    w[:, 0] = torch.finfo(torch.float32).max * torch.linspace(0.8, 1.0, 44, device=device)
    with pytest.raises(ValueError, match="overflow float32 once double-quantized"):
        qt.quantize_nf4(w, double_quant=True)
    assert bool(qt.dequantize_nf4(qt.quantize_nf4(w, double_quant=False)).isfinite().all())


# ---- 6. NF4Weight structure and values ---------------------------------------------------

def test_float_absmax_beside_nested_fields_is_refused():
    nested, plain = _qw(double_quant=True), _qw(double_quant=False)
    with pytest.raises(ValueError, match="absmax is float32"):
        dataclasses.replace(nested, absmax=plain.absmax)


@pytest.mark.parametrize("blocksize2", [0, 3, 100, 256.0, True])
def test_bad_blocksize2(blocksize2):
    with pytest.raises((TypeError, ValueError), match="blocksize2"):
        dataclasses.replace(_qw(), blocksize2=blocksize2)


@pytest.mark.parametrize("shape", [(-40, -96), (40, 96.0), "40x96", torch.tensor([40, 96])])
def test_bad_shape(shape):
    with pytest.raises((TypeError, ValueError), match="shape"):
        dataclasses.replace(_qw(), shape=shape)


@pytest.mark.parametrize("field", ["absmax", "offset", "code", "absmax2", "code2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hand_built_weight(backend, device, field, bad):
    qw = _qw(double_quant=field != "absmax", device=device)
    t = getattr(qw, field).clone()
    t.view(-1)[t.numel() // 2] = bad
    hand_built = dataclasses.replace(qw, **{field: t})  # structure only: no device sync
    name = "absmax" if field in ("absmax", "absmax2") else field
    with pytest.raises(ValueError, match=name):
        qt.dequantize_nf4(hand_built)
    with pytest.raises(ValueError, match=name):
        hand_built.check_finite()
    with pytest.raises(ValueError, match=name):
        qt.Linear4bit(hand_built)


# ---- 8. non-contiguous x -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 16, 40])
def test_noncontiguous_x_is_bit_identical(backend, device, dtype, M):
    qw = _qw((48, 96), dtype=dtype, device=device)
    transposed = torch.randn(96, M, device=device).to(dtype).t()
    sliced = torch.randn(M, 200, device=device).to(dtype)[:, 7:103]
    every_other = torch.randn(M, 192, device=device).to(dtype)[:, ::2]
    for x in (transposed, sliced, every_other):
        if x.is_contiguous():
            continue  # one row: a transpose or a column slice is contiguous
        assert torch.equal(qt.nf4_matmul(x, qw), qt.nf4_matmul(x.contiguous(), qw))
        gy = torch.randn(48, M, device=device).to(dtype).t()
        assert torch.equal(qt.nf4_matmul_grad_input(gy, qw), qt.nf4_matmul_grad_input(gy.contiguous(), qw))


# ---- 9. clear errors for malformed states ----------------------------------------------

def _tampered(meta_bytes: bytes):
    sd = _qw().state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(meta_bytes), dtype=torch.uint8)
    return sd


def _meta(**changes):
    meta = json.loads(bytes(_qw().state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta.update(changes)
    return json.dumps({k: v for k, v in meta.items() if v is not ...}).encode()


@pytest.mark.parametrize("blob, match", [
    (b"\xff\xfe{", "not UTF-8 JSON"),
    (b"{not json", "not UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (_meta(dtype="foo"), "dtype must be"),
    (_meta(nested_blocksize=0), "blocksize2"),
    (_meta(blocksize=64.7), "blocksize must be a JSON int"),
    (_meta(shape=...), "lacks 'shape'"),
    (_meta(nested_offset=...), "lacks 'nested_offset'"),
    (_meta(shape="40x96"), "shape must be a JSON list"),
], ids=["utf8", "json", "list", "dtype", "nested_blocksize0", "blocksize-float", "no-shape",
        "no-offset", "shape-str"])
def test_tampered_quant_state(blob, match):
    with pytest.raises(ValueError, match=match) as info:
        qt.NF4Weight.from_state_dict(_tampered(blob))
    assert "quant_state" in str(info.value) or "under 'weight'" in str(info.value)


def test_missing_state_dict_keys_are_named():
    for key in ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"):
        sd = _qw().state_dict()
        del sd[key]
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            qt.NF4Weight.from_state_dict(sd)


def test_tampered_state_dict_in_linear4bit_load_state_dict():
    layer = qt.Linear4bit(_qw())
    sd = layer.state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(_meta(dtype="foo")), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="dtype must be"):
        layer.load_state_dict(sd)


def test_quantize_meta_tensor():
    with pytest.raises(ValueError, match="w is on the meta device"):
        qt.quantize_nf4(torch.empty(64, 64, device="meta"))


def test_from_linear_nan_names_linear_weight():
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="linear.weight"):
        qt.Linear4bit.from_linear(linear)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_linear4bit_bias_dtype(dtype):
    with pytest.raises(TypeError, match="bias must be float32"):
        qt.Linear4bit(_qw((8, 64)), bias=torch.ones(8, dtype=dtype))


def test_optimizer_state_dict_without_step():
    p = torch.nn.Parameter(torch.randn(10))
    opt = qt.PagedAdamW([p])
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["step"]
    with pytest.raises(ValueError, match="lacks 'step'"):
        qt.PagedAdamW([p]).load_state_dict(sd)
    with pytest.raises(ValueError, match="param_groups"):
        qt.PagedAdamW([p]).load_state_dict({"state": {}})


# ---- 10. subnormal weights (documented in docs/format.md) --------------------------------

def test_subnormal_blocks_follow_bitsandbytes(backend, device, bnb):
    # Blocks whose absmax is below 1e-38 are scaled by 1 / 1e-38 (not 1 / absmax),
    # exactly as bitsandbytes: coarser, but byte-identical to its quantizer.
    w = torch.randn(8, 64, device=device) * 1e-39
    qw = qt.quantize_nf4(w, double_quant=False).to("cpu")
    packed, state = bnb.functional.quantize_4bit(w.cpu(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(qw.packed, packed.reshape(-1)) and torch.equal(qw.absmax, state.absmax)
    rel = float((qt.dequantize_nf4(qw.to(device)).double() - w.double()).norm() / w.double().norm())
    assert 0.3 < rel < 1.0  # the documented loss (normal scales: ~0.09)


# ---- 7. a NaN / Inf gradient element in PagedAdamW8bit --------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_8bit_adamw_loses_only_the_bad_element(device, bad):
    torch.manual_seed(0)
    n, i, lr = 1000, 300, 1e-2  # element 300 sits in the second 256-block
    p0 = torch.randn(n, device=device)
    grads = [torch.randn(n, device=device) for _ in range(4)]
    grads[1][i] = bad
    runs = {}
    for backend in ("triton", "torch"):
        if backend == "triton" and not qt.backend.INTERPRET and not torch.cuda.is_available():
            continue
        with qt.force_backend(backend):
            p = torch.nn.Parameter(p0.clone())
            opt = qt.PagedAdamW8bit([p], lr=lr, weight_decay=0.0, min_8bit_size=0)
            for step, g in enumerate(grads):
                if step == 3:  # the user repairs the lost element
                    with torch.no_grad():
                        p[i] = 0.0
                before = p.detach().clone()
                p.grad = g.clone()
                opt.step()
                if step in (1, 2):  # as torch.optim.AdamW: that element only is NaN
                    assert torch.isnan(p[i]) and bool(p.detach()[torch.arange(n, device=device) != i].isfinite().all())
                if step == 1:  # its moments are stored as exactly 0 (8 bits hold no NaN)
                    assert all(float(m[i]) == 0.0 for m in opt.dequantized_moments(p))
                state = opt.state[p]
                assert bool(state["exp_avg_absmax"].isfinite().all())
                assert bool(state["exp_avg_sq_absmax"].isfinite().all())
                assert all(bool(m.isfinite().all()) for m in opt.dequantized_moments(p))
            # After the repair, the element moves like a fresh one: at most about lr.
            assert abs(float(p[i] - before[i])) <= 1.5 * lr
            runs[backend] = (p.detach().clone(), *opt.dequantized_moments(p))
    if len(runs) == 2:  # the backends agree (to the kernel's fma rounding, see test_optim.py)
        for a, b in zip(runs["triton"], runs["torch"]):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    # The other elements ran as without the bad element, up to the block's
    # absmax (which the bad element no longer touches): compare with torch.
    ref = torch.nn.Parameter(p0.clone())
    topt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    for g in grads:
        ref.grad = g.clone()
        topt.step()
    ok = torch.arange(n, device=device) != i
    out = runs["torch"][0]
    assert float((out[ok] - ref.detach()[ok]).abs().max()) < 0.2 * lr
