"""NF4Weight: the container, its state-dict form, bitsandbytes interop, and
every bad-input rule of docs/bad-input.md for quantize / dequantize."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qlora_triton as qt


def _qw(double_quant=True, shape=(45, 77), dtype=torch.bfloat16):
    return qt.quantize_nf4(torch.randn(shape).to(dtype), double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_matches_bitsandbytes_keys_and_values(bnb, double_quant):
    bnbF = bnb.functional
    qw = _qw(double_quant)
    ours = qw.state_dict("weight")
    packed, state = qw.to_bnb()
    theirs = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    theirs["weight"] = packed
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(theirs[key].tolist()))
        else:
            assert torch.equal(ours[key], theirs[key]), key
    # ... and bitsandbytes reads ours back.
    back = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in ours.items() if k != "weight"},
                                     device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(ours["weight"], back), qt.dequantize_nf4(qw))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_roundtrip_without_bitsandbytes(double_quant):
    qw = _qw(double_quant)
    again = qt.NF4Weight.from_state_dict(qw.state_dict("layer.weight"), prefix="layer.weight")
    for name, t in qw.tensors().items():
        assert torch.equal(t, getattr(again, name)), name
    assert (again.shape, again.dtype, again.blocksize) == (qw.shape, qw.dtype, qw.blocksize)


def test_to_device_keeps_everything():
    qw = _qw()
    moved = qw.to("cpu")
    assert moved.device.type == "cpu" and moved.double_quant
    assert all(torch.equal(t, getattr(moved, n)) for n, t in qw.tensors().items())


# ---- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("blocksize", [16, 48, 8192, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises((ValueError, TypeError), match="blocksize"):
        qt.quantize_nf4(torch.randn(8, 8), blocksize=blocksize)


@pytest.mark.parametrize("w", [torch.arange(64), torch.randn(64).double(), [1.0, 2.0]], ids=["int", "fp64", "list"])
def test_bad_weight_type(w):
    with pytest.raises(TypeError, match="w must"):
        qt.quantize_nf4(w)


def test_empty_weight():
    with pytest.raises(ValueError, match="w must have at least one element"):
        qt.quantize_nf4(torch.randn(0, 16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(bad):
    w = torch.randn(10, 10)
    w[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        qt.quantize_nf4(w)


def test_bad_double_quant_flag():
    with pytest.raises(TypeError, match="double_quant"):
        qt.quantize_nf4(torch.randn(64), double_quant="yes")


def test_dequantize_bad_arguments():
    with pytest.raises(TypeError, match="qw must be an NF4Weight"):
        qt.dequantize_nf4(torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        qt.dequantize_nf4(_qw(), dtype=torch.int8)


def test_absmax_length_must_match_shape():
    qw = _qw(double_quant=False)
    with pytest.raises(ValueError, match="absmax has"):
        dataclasses.replace(qw, absmax=qw.absmax[:-1])
    with pytest.raises(ValueError, match="absmax has"):
        dataclasses.replace(qw, shape=torch.Size([45, 200]), packed=torch.zeros(4500, dtype=torch.uint8))


def test_packed_length_and_dtype():
    qw = _qw()
    with pytest.raises(ValueError, match="packed has"):
        dataclasses.replace(qw, packed=qw.packed[:-1])
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        dataclasses.replace(qw, packed=qw.packed.to(torch.int16))


def test_nested_parts_required():
    qw = _qw(double_quant=True)
    with pytest.raises(ValueError, match="absmax2"):
        dataclasses.replace(qw, absmax2=None)


def test_device_mismatch():
    qw = _qw(double_quant=False)
    with pytest.raises(ValueError, match="one device"):
        dataclasses.replace(qw, absmax=qw.absmax.to("meta"))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nan_blocks_are_named(double_quant):
    qw = _qw(double_quant)
    sd = qw.state_dict()
    key = "weight.nested_absmax" if double_quant else "weight.absmax"
    sd[key] = sd[key].clone()
    sd[key][0] = float("nan")
    with pytest.raises(ValueError, match=r"absmax: \d+ of \d+ blocks have a NaN or Inf scale"):
        qt.NF4Weight.from_state_dict(sd)


def test_fp4_is_refused(bnb):
    bnbF = bnb.functional
    packed, state = bnbF.quantize_4bit(torch.randn(64, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        qt.NF4Weight.from_bnb(packed, state)
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ValueError, match="FP4"):
        qt.NF4Weight.from_state_dict(sd)


def test_force_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        with qt.force_backend("cuda"):
            pass
