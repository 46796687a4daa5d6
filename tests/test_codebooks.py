import hashlib

import pytest
import torch

import qlora_triton as qt
from qlora_triton.codebooks import midpoints

DYNAMIC_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def test_nf4_codebook_equals_bitsandbytes(bnb):
    code = qt.nf4_codebook()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, bnb.functional.get_4bit_type("nf4", device="cpu"))


def test_nf4_codebook_is_scipy_normal_quantiles():
    # The construction in scipy.stats' own words: quantiles of float32 probabilities,
    # 8 positive, 7 negative, 0, normalized by the largest.
    from scipy.stats import norm

    top = 0.9677083
    pos = norm.ppf(torch.linspace(top, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(top, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(pos + [0.0] + neg, dtype=torch.float32).sort().values
    assert torch.equal(qt.nf4_codebook(), values / values.max())


def test_nf4_codebook_shape_of_the_distribution():
    code = qt.nf4_codebook()
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0
    assert bool((code[1:] > code[:-1]).all())
    # 8 positive and 7 negative values: asymmetric by construction.
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7


def test_dynamic_map_bytes_and_range():
    dyn = qt.dynamic_map()
    assert dyn.dtype == torch.float32 and dyn.shape == (256,)
    assert hashlib.sha256(dyn.numpy().tobytes()).hexdigest() == DYNAMIC_SHA256
    assert dyn.min() == torch.tensor(-0.99296875) and dyn.max() == 1.0


@pytest.mark.parametrize("device", [None, "cpu"])
def test_codebooks_are_fresh_copies(device):
    # Each weight owns its codebooks: writing one (or saving a model with
    # safetensors, which refuses shared storage) must not touch another.
    for make in (qt.nf4_codebook, qt.dynamic_map):
        a, b = make(device), make(device)
        assert a.data_ptr() != b.data_ptr()
        first = float(b[0])
        a.fill_(3.0)
        assert float(make(device)[0]) == first == float(b[0])


def test_midpoints_lie_between_codes():
    code = qt.dynamic_map()
    mid = midpoints(code)
    assert mid.shape == (255,)
    assert bool((mid > code[:-1]).all()) and bool((mid < code[1:]).all())
