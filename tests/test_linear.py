"""Linear4bit: forward vs the float64 reference, NF4 storage under .to()/.half(),
and state dicts in bitsandbytes' keys, both ways with bitsandbytes itself."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_triton as qt
from helpers import rel_err

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ref_forward(layer, x):
    w = qt.dequantize_nf4(layer.quant_weight, torch.float32).double()
    y = x.detach().double() @ w.t()
    return y if layer.bias is None else y + layer.bias.detach().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,bias", [((3, 77, 45), True), ((1, 64, 33), False), ((2, 5, 130, 96), True)])
def test_forward_matches_reference(backend, device, dtype, shape, bias):
    *lead, k, n = shape
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(k, n, bias=bias, device=device))
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_err(y, ref_forward(layer, x)) <= TOL[dtype]
    g = torch.randn_like(y)
    y.backward(g)
    w = qt.dequantize_nf4(layer.quant_weight, torch.float32).double()
    assert rel_err(x.grad, g.double() @ w) <= TOL[dtype]
    assert not any(p.requires_grad for p in layer.parameters())


def test_trainable_bias_gets_a_grad(device):
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(20, 12, device=device))
    layer.bias.requires_grad_(True)
    g = torch.randn(4, 12, device=device)
    layer(torch.randn(4, 20, device=device)).backward(g)
    assert torch.allclose(layer.bias.grad, g.sum(0))


def test_half_and_to_keep_the_nf4_storage_exact(device):
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(40, 24, device=device))
    before = {n: p.clone() for n, p in layer.nf4_parameters().items()}
    assert len(before) == 6
    layer.half()
    assert layer.bias.dtype == torch.float16
    for n, p in layer.nf4_parameters().items():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n
    layer.to(torch.float32).to(device).bfloat16()
    assert set(layer.nf4_parameters()) == set(before)
    assert all(torch.equal(p, before[n]) for n, p in layer.nf4_parameters().items())
    x = torch.randn(2, 40, dtype=torch.float16, device=device)
    assert layer(x).dtype == torch.float16


def test_nf4_storage_is_frozen_non_float_parameters():
    # Parameters so that FSDP2 shards them; integer dtypes so that nothing
    # that casts float parameters (mixed precision, .half()) touches them.
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(40, 24), double_quant=False)
    params = layer.nf4_parameters()
    assert set(params) == {"weight", "weight_absmax", "weight_code"}
    assert dict(layer.named_buffers()) == {}
    assert {n for n, _ in layer.named_parameters()} == set(params) | {"bias"}
    assert params["weight_absmax"].dtype == torch.int32 and params["weight_code"].dtype == torch.int32
    assert torch.equal(params["weight_code"].view(torch.float32), qt.nf4_codebook())
    layer2 = qt.Linear4bit.from_linear(torch.nn.Linear(40, 24))
    params2 = layer2.nf4_parameters()
    assert set(params2) == set(params) | {"weight_absmax2", "weight_code2", "weight_offset"}
    assert layer2.weight.shape == (40 * 24 // 2, 1) and layer2.weight.dtype == torch.uint8
    assert params2["weight_absmax"].dtype == torch.uint8 and params2["weight_offset"].shape == (1,)
    assert not any(p.requires_grad or p.is_floating_point() for p in params2.values())
    assert torch.equal(params2["weight_code2"].view(torch.float32), qt.dynamic_map())


def test_a_data_swap_is_seen(device):
    # param.data = ... keeps the Parameter object: the view must follow the data.
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(40, 24, device=device))
    other = qt.Linear4bit.from_linear(torch.nn.Linear(40, 24, device=device))
    x = torch.randn(3, 40, device=device)
    layer(x)
    for name, p in layer.nf4_parameters().items():
        p.data = other.nf4_parameters()[name].detach().clone()
    with torch.no_grad():
        layer.bias.copy_(other.bias)
    assert torch.equal(layer(x), other(x))


def _bnb_layer(bnb, k, n, bias=True, sd=None):
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    if sd is None:
        return layer.to("cpu")  # bitsandbytes quantizes on the move
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if bias:
        layer.bias = torch.nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return layer


@pytest.mark.parametrize("k,n", [(70, 45), (128, 64)])
def test_bitsandbytes_state_dict_loads_into_ours(bnb, k, n):
    theirs = _bnb_layer(bnb, k, n)
    sd = {key: v.clone() for key, v in theirs.state_dict().items()}  # before bnb's CPU repacking
    ours = qt.Linear4bit.from_linear(torch.nn.Linear(k, n), compute_dtype=torch.bfloat16)
    assert ours.load_state_dict(sd) is not None
    for key, v in ours.state_dict().items():
        assert torch.equal(v.reshape(-1), sd[key].reshape(-1)), key
    # (bitsandbytes' CPU path repacks the weight in eval mode and then needs
    # N % 32 == 0; training mode keeps its plain dequantize + matmul.)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
    assert got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("k,n", [(70, 45), (128, 64)])
def test_our_state_dict_loads_into_bitsandbytes(bnb, k, n):
    ours = qt.Linear4bit.from_linear(torch.nn.Linear(k, n, dtype=torch.bfloat16), compute_dtype=torch.bfloat16)
    sd = ours.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    theirs = _bnb_layer(bnb, k, n, sd=sd)
    for key, v in theirs.state_dict().items():
        assert torch.equal(v.reshape(-1), sd[key].reshape(-1)), key
    x = torch.randn(3, k, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= TOL[torch.bfloat16]


def test_state_dict_round_trip_and_format_change(device):
    src = qt.Linear4bit.from_linear(torch.nn.Linear(50, 30, device=device), blocksize=128, double_quant=False)
    dst = qt.Linear4bit.from_linear(torch.nn.Linear(50, 30, device=device))  # blocksize 64, nested
    dst.load_state_dict(src.state_dict())
    assert dst.quant_weight.absmax.dtype == torch.float32 and dst.weight_absmax2 is None
    assert dst.quant_weight.blocksize == 128
    x = torch.randn(4, 50, device=device)
    assert torch.equal(dst(x), src(x))


def test_dense_state_dict_is_quantized_on_load(device):
    linear = torch.nn.Linear(50, 30, device=device)
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(50, 30, device=device))
    layer.load_state_dict(linear.state_dict())
    x = torch.randn(4, 50, device=device)
    assert torch.equal(layer(x), qt.Linear4bit.from_linear(linear)(x))


def test_load_errors_are_clear():
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(50, 30))
    other = qt.Linear4bit.from_linear(torch.nn.Linear(50, 31))
    with pytest.raises(RuntimeError, match="does not match"):
        layer.load_state_dict(other.state_dict())
    sd = layer.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match="not a bitsandbytes NF4 weight"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": torch.zeros(30)})
    for extra in ("extra", "weight.bogus"):
        with pytest.raises(RuntimeError, match=f"Unexpected key.*{extra}"):
            layer.load_state_dict({**layer.state_dict(), extra: torch.zeros(1)})


def test_lora_state_dict_and_peft_prefix(device):
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(40, 24, device=device), r=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    sd = layer.state_dict()
    assert {"weight", "bias", "lora_A.weight", "lora_B.weight"} <= set(sd)
    # PEFT's layout of the same layer: base_layer.* and per-adapter names.
    peft_sd = {("base_layer." + k if not k.startswith("lora_") else k.replace(".weight", ".default.weight")): v
               for k, v in sd.items()}
    fresh = qt.LoRALinear4bit.from_linear(torch.nn.Linear(40, 24, device=device), r=4)
    fresh.load_state_dict(peft_sd)
    x = torch.randn(3, 40, device=device)
    assert torch.equal(fresh(x), layer(x))
    model = torch.nn.Sequential(qt.LoRALinear4bit.from_linear(torch.nn.Linear(40, 24, device=device), r=4))
    model.load_state_dict({"0." + k: v for k, v in peft_sd.items()})
    assert torch.equal(model(x), layer(x))


def test_bad_construction():
    with pytest.raises(TypeError, match="weight"):
        qt.Linear4bit(torch.randn(4, 4))
    with pytest.raises(ValueError, match="bias"):
        qt.Linear4bit(qt.quantize_nf4(torch.randn(6, 8)), bias=torch.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        qt.Linear4bit(qt.quantize_nf4(torch.randn(6, 8, 2)))
    with pytest.raises(TypeError, match="linear"):
        qt.Linear4bit.from_linear(torch.nn.Embedding(4, 4))


def test_bias_argument_checks():
    qw = qt.quantize_nf4(torch.randn(6, 8))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        qt.Linear4bit(qw, bias=[0.0] * 6)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        qt.Linear4bit(qw, bias=torch.randn(5))


def test_saved_offset_follows_in_place_writes():
    # DDP's construction syncs parameters from rank 0 in place; the saved quant_state
    # must carry the offset the kernels then use, not the one the layer was built with.
    layer = qt.Linear4bit.from_linear(torch.nn.Linear(96, 40))
    offset = float(torch.rand(()) * 0.1 + 0.01)
    with torch.no_grad():
        layer.weight_offset.copy_(torch.tensor([offset]).view(torch.int32))
    blob = layer.state_dict()["weight.quant_state.bitsandbytes__nf4"]
    assert json.loads(bytes(blob.tolist()))["nested_offset"] == torch.tensor(offset).item()
    assert float(layer.quant_weight.offset) == torch.tensor(offset).item()
