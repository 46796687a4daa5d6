"""LoRALinear4bit and its fused autograd Function against a float64 reference:
dense fp32 dequantized W plus plain torch LoRA, computed in float64."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

import qlora_triton as qt
from qlora_triton import lora
from helpers import rel_err

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_layer(k, n, r=5, bias=True, dropout=0.0, rslora=False, alpha=16, dtype=torch.float32,
               device=None):
    """A LoRALinear4bit with a random (non-zero) lora_B so the LoRA path counts."""
    linear = torch.nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
    layer = qt.LoRALinear4bit.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                          use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 1 / r)  # comparable to the base output
    return layer


def reference(layer, x, mask=None, p=0.0):
    """float64 forward of the same layer; differentiable wrt x, A, B, bias."""
    w = qt.dequantize_nf4(layer.quant_weight, torch.float32).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().double().requires_grad_(layer.bias.requires_grad)
    x_d = x64 if mask is None else x64 * mask.double() / (1 - p)
    y = x64 @ w.t() + layer.scaling * (x_d @ a.t()) @ b.t()
    if bias is not None:
        y = y + bias
    return y, x64, a, b, bias


CASES = [  # (leading dims, K, N, r)
    ((2, 3), 77, 45, 5),
    ((1,), 64, 33, 8),
    ((17,), 130, 96, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n,r", CASES)
@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.3, marks=pytest.mark.gpu)])
def test_forward_and_grads_match_reference(backend, device, dtype, lead, k, n, r, dropout):
    layer = make_layer(k, n, r=r, dropout=dropout, device=device)
    layer.bias.requires_grad_(True)  # trainable bias: its grad is checked too
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_()
    g = torch.randn(*lead, n, device=device).to(dtype)

    seed = torch.seed()
    y = layer(x)
    y.backward(g)
    mask = None
    if dropout:
        torch.manual_seed(seed)  # the same draw the layer made
        mask = lora._dropout_mask(x, dropout)
        assert 0 < int(mask.sum()) < mask.numel()
    y_ref, x64, a, b, bias = reference(layer, x, mask, dropout)
    y_ref.backward(g.double())

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_err(y, y_ref) <= tol
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, x64.grad) <= tol
    assert rel_err(layer.lora_A.weight.grad, a.grad) <= tol
    assert rel_err(layer.lora_B.weight.grad, b.grad) <= tol
    assert rel_err(layer.bias.grad, bias.grad) <= tol
    assert layer.lora_A.weight.grad.dtype == torch.float32  # master adapters stay fp32


def test_base_weight_never_gets_a_grad(device):
    layer = make_layer(40, 24, device=device)
    x = torch.randn(5, 40, requires_grad=True, device=device)
    layer(x).square().sum().backward()
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    assert layer.bias.grad is None and not layer.bias.requires_grad  # frozen by default
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"lora_A.weight", "lora_B.weight"}


def test_fresh_layer_equals_its_base_and_init():
    linear = torch.nn.Linear(70, 30)
    layer = qt.LoRALinear4bit.from_linear(linear, r=4)
    base = qt.Linear4bit.from_linear(linear)
    x = torch.randn(3, 70)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert not torch.all(layer.lora_A.weight == 0)
    bound = 1 / 70 ** 0.5  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert float(layer.lora_A.weight.detach().abs().max()) <= bound
    assert layer.scaling == 4.0
    assert qt.LoRALinear4bit.from_linear(linear, r=4, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("requires_grad", [(True, True, True), (False, True, True), (True, False, False),
                                           (False, False, True), (False, True, False)])
def test_only_needed_grads_are_computed(device, requires_grad):
    layer = make_layer(33, 20, dropout=0.2, device=device)
    need_x, need_a, need_b = requires_grad
    x = torch.randn(4, 33, requires_grad=need_x, device=device)
    layer.lora_A.weight.requires_grad_(need_a)
    layer.lora_B.weight.requires_grad_(need_b)
    layer(x).sum().backward()
    assert (x.grad is not None) == need_x
    assert (layer.lora_A.weight.grad is not None) == need_a
    assert (layer.lora_B.weight.grad is not None) == need_b


def test_no_dense_weight_is_saved_for_backward(device):
    k, n = 512, 384
    layer = make_layer(k, n, r=8, dropout=0.1, device=device)
    x = torch.randn(4, k, requires_grad=True, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    dense_bytes = n * k * 4
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved, "nothing saved at all: the test would prove nothing"
    assert saved_bytes < dense_bytes / 20, (saved_bytes, dense_bytes)
    assert not any(t.numel() >= n * k // 2 for t in saved)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_saves_nothing(device, mode):
    layer = make_layer(48, 40, device=device).eval()
    x = torch.randn(3, 48, device=device)
    with torch.no_grad():
        want = layer(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if mode == "no_grad":
            with torch.no_grad():
                y = layer(x)
        elif mode == "inference_mode":
            with torch.inference_mode():
                y = layer(x)
        else:
            layer.requires_grad_(False)
            y = layer(x)
    assert not saved and y.grad_fn is None
    assert torch.equal(y, want)


def test_dropout_is_seeded_and_off_in_eval(device):
    layer = make_layer(64, 32, dropout=0.5, device=device)
    x = torch.randn(6, 64, device=device)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(layer(x), y1)  # a fresh mask
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.lora_dropout = 0.0
    layer.train()
    assert torch.equal(layer(x), layer.eval()(x))


def test_checkpoint_recomputes_the_same_mask(device):
    layer = make_layer(50, 30, dropout=0.4, device=device)
    x = torch.randn(2, 7, 50, requires_grad=True, device=device)

    def grads(use_checkpoint):
        torch.manual_seed(3)
        for p in (x, layer.lora_A.weight, layer.lora_B.weight):
            p.grad = None
        if use_checkpoint:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

    for plain, ckpt in zip(grads(False), grads(True)):
        assert torch.equal(plain, ckpt)


def test_autocast_computes_in_the_autocast_dtype(device):
    layer = make_layer(72, 40, r=4, device=device)
    x = torch.randn(5, 72, requires_grad=True, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    y_ref, x64, a, b, _ = reference(layer, x)
    y_ref.sum().backward()
    assert rel_err(y, y_ref) <= TOL[torch.bfloat16]
    assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32
    assert rel_err(x.grad, x64.grad) <= TOL[torch.bfloat16]
    assert rel_err(layer.lora_A.weight.grad, a.grad) <= TOL[torch.bfloat16]
    assert rel_err(layer.lora_B.weight.grad, b.grad) <= TOL[torch.bfloat16]


def test_compute_dtype_casts_in_and_back(device):
    linear = torch.nn.Linear(66, 20, device=device)
    layer = qt.LoRALinear4bit.from_linear(linear, r=2, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 66, device=device)
    y = layer(x)
    assert y.dtype == torch.float32
    assert rel_err(y, reference(layer, x)[0]) <= TOL[torch.bfloat16]


def test_empty_input(device):
    layer = make_layer(40, 24, device=device)
    x = torch.randn(0, 40, requires_grad=True, device=device)
    y = layer(x)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 40)
    assert torch.equal(layer.lora_B.weight.grad, torch.zeros_like(layer.lora_B.weight))


def test_non_contiguous_input_matches_contiguous(device):
    layer = make_layer(40, 24, device=device)
    x = torch.randn(40, 6, device=device).t()
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_torch_compile_has_no_graph_break():
    torch._dynamo.reset()
    model = torch.nn.Sequential(make_layer(48, 64, r=4), torch.nn.GELU(), make_layer(64, 24, r=4))
    x = torch.randn(3, 5, 48, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    x.grad = None
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    want = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    assert rel_err(y, y_eager) <= 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("kwargs, exc", [
    (dict(r=0), ValueError), (dict(r=2.0), ValueError), (dict(r=True), ValueError),
    (dict(lora_alpha=0), ValueError), (dict(lora_alpha=float("nan")), ValueError),
    (dict(lora_dropout=1.0), ValueError), (dict(lora_dropout=-0.1), ValueError),
    (dict(use_rslora=1), TypeError), (dict(compute_dtype=torch.int8), TypeError),
    (dict(blocksize=48), ValueError),
])
def test_from_linear_bad_arguments(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        qt.LoRALinear4bit.from_linear(torch.nn.Linear(8, 8), **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear"):
        qt.LoRALinear4bit.from_linear(torch.nn.Conv1d(4, 4, 1))


def test_bad_input_is_named(device):
    layer = make_layer(16, 8, device=device)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(3, 15, device=device))
    with pytest.raises(TypeError, match="x must be"):
        layer(torch.ones(3, 16, dtype=torch.int64, device=device))


def test_torch_compile_with_dropout_and_autocast():
    # aot_eager: Dynamo + AOTAutograd trace forward and backward (where graph
    # breaks would show) without paying for Inductor's codegen twice.
    torch._dynamo.reset()
    layer = make_layer(48, 64, r=4, dropout=0.2)
    x = torch.randn(3, 48, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and bool(layer.lora_A.weight.grad.abs().sum() > 0)
