"""What loads must refuse rather than load silently wrong: adapter files with NaN,
Inf or integer tensors, and a meta-tensor bias beside a real weight."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

import qlora_triton as qt

safetensors_torch = pytest.importorskip("safetensors.torch")

A_KEY = "base_model.model.0.lora_A.weight"
B_KEY = "base_model.model.2.lora_B.weight"


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    for i in (0, 2):
        model[i] = qt.LoRALinear4bit.from_linear(model[i], r=4, lora_alpha=8)
        with torch.no_grad():
            model[i].lora_B.weight.normal_()
    return model


def _lora(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]


def _saved(tmp_path) -> tuple[nn.Module, str]:
    folder = tmp_path / "adapter"
    model = _model()
    qt.save_adapter(model, folder)
    return model, str(folder / "adapter_model.safetensors")


def _rewrite(path: str, key: str, change) -> None:
    tensors = safetensors_torch.load_file(path)
    tensors[key] = change(tensors[key])
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


def _flip_to_inf(path: str, key: str, element: int) -> None:
    """Overwrite one fp32 element of ``key`` in the file with +Inf, in place (a
    few flipped bytes: safetensors has no checksum)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        assert header[key]["dtype"] == "F32"
        f.seek(8 + n + header[key]["data_offsets"][0] + 4 * element)
        f.write(struct.pack("<I", 0x7F800000))


def test_load_adapter_refuses_nan_and_names_key_and_file(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite(path, B_KEY, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))
    target = _model()
    before = _lora(target)
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        qt.load_adapter(target, tmp_path / "adapter")
    assert B_KEY in str(err.value) and path in str(err.value) and "32 of 128" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, _lora(target)))  # nothing loaded


def test_load_adapter_refuses_flipped_bytes_that_make_inf(tmp_path):
    model, path = _saved(tmp_path)
    _flip_to_inf(path, A_KEY, element=77)
    with pytest.raises(ValueError, match="NaN or Inf") as err:
        qt.load_adapter(_model(), tmp_path / "adapter")
    assert A_KEY in str(err.value) and path in str(err.value) and "(1, 13)" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_load_adapter_refuses_non_float_tensors(tmp_path, dtype):
    model, path = _saved(tmp_path)
    _rewrite(path, A_KEY, lambda t: (t * 10).to(dtype))
    with pytest.raises(TypeError, match="floating point") as err:
        qt.load_adapter(_model(), tmp_path / "adapter")
    assert A_KEY in str(err.value) and path in str(err.value) and str(dtype) in str(err.value)


def test_load_adapter_takes_half_precision_files(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite(path, B_KEY, lambda t: t.to(torch.bfloat16))
    target = qt.load_adapter(_model(), tmp_path / "adapter")
    assert torch.equal(target[2].lora_B.weight, model[2].lora_B.weight.to(torch.bfloat16).float())


# --------------------------------------------------------------------------- meta bias

def test_meta_bias_beside_a_real_weight_says_what_to_do(device):
    qw = qt.quantize_nf4(torch.randn(24, 64, device=device))
    bias = torch.empty(24, device="meta")
    for build in (lambda: qt.Linear4bit(qw, bias=bias),
                  lambda: qt.LoRALinear4bit(qw, bias=bias, r=2, lora_alpha=4)):
        with pytest.raises(ValueError, match="bias is a meta tensor.*bias=None"):
            build()
    # A skeleton entirely on the meta device (the loaders fill it later) is fine.
    skeleton = qt.Linear4bit(qw.to("meta"), bias=bias)
    assert skeleton.bias.is_meta


def test_from_linear_with_meta_tensors_names_them(device):
    with torch.device("meta"):
        linear = nn.Linear(64, 24)
    with pytest.raises(ValueError, match="linear.weight is a meta tensor"):
        qt.Linear4bit.from_linear(linear)
    linear.weight = nn.Parameter(torch.randn(24, 64, device=device))
    for convert in (qt.Linear4bit.from_linear, qt.LoRALinear4bit.from_linear):
        with pytest.raises(ValueError, match="linear.bias is a meta tensor.*load_state_dict"):
            convert(linear)
        with pytest.raises(ValueError, match="linear.bias is a meta tensor"):
            convert(linear, device=device)


# --------------------------------------------------------------------------- int32 offsets

def test_launches_whose_last_tile_would_wrap_int32_are_refused():
    # Meta tensors: a shape without memory; the check runs before any launch.
    from qlora_triton.adamw_scalars import AdamWScalars
    from qlora_triton.ops import optimizer as ops_optimizer
    from qlora_triton.ops import quantize as ops_quantize

    n = 2**31 - 10  # fits int32, but the last tile of every launch reaches past it
    x = torch.empty(n, device="meta")
    with pytest.raises(ValueError, match="x has 2147483638 elements.*past int32"):
        ops_quantize.nf4_quantize(x, 64)
    with pytest.raises(ValueError, match="x has 2147483638 elements.*past int32"):
        ops_quantize.blockwise_8bit_quantize(x, torch.linspace(-1, 1, 256), 256)
    codes = torch.empty(n, dtype=torch.uint8, device="meta")
    absmax = torch.empty(-(-n // 256), device="meta")
    scalars = AdamWScalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="param has 2147483638 elements.*past int32"):
        ops_optimizer.adamw_step(x, x, codes, codes, scalars, absmax, absmax)
    # and the two dequantize kernels (the dequant strategy's first half, the 8-bit moments)
    from qlora_triton.ops import dequantize as ops_dequantize
    from qlora_triton.weight import NF4Weight

    with pytest.raises(ValueError, match="q has 2147483638 elements.*past int32"):
        ops_dequantize.blockwise_8bit_dequantize(codes, absmax, torch.linspace(-1, 1, 256), 256)
    qw = NF4Weight.empty((1, n), torch.bfloat16)  # within int32; its last tile is not
    with pytest.raises(ValueError, match="qw has 2147483638 elements.*past int32"):
        ops_dequantize.nf4_dequantize(qw, torch.bfloat16)
