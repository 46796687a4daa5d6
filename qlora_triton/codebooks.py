"""The two codebooks of QLoRA, generated rather than typed in.

* NF4: 16 values from quantiles of the standard normal distribution, so that a
  normally distributed weight fills each of the 16 bins about equally. Exactly 0
  is representable (index 7) so that padding and zero weights stay exact.
* The signed 8-bit dynamic map: a tree of decimal exponents with linear
  fractions, used for the second quantization level (double quantization of the
  absmax constants) and for 8-bit optimizer states.

Both follow the construction used by bitsandbytes bit for bit; the precision of
each step matters (see the comments): float32 linspaces, float64 quantiles.
"""

from __future__ import annotations

import functools

import torch

# Upper quantile probability of NF4. It is close to 1 - (1/30 + 1/32) / 2 but
# that exact value does not reproduce bitsandbytes' table; this literal does.
_NF4_OFFSET = 0.9677083


def _ppf(p: torch.Tensor) -> torch.Tensor:
    """Standard-normal quantiles of float32 probabilities: computed in float64, rounded to float32.

    scipy's ``ndtri`` is the function ``scipy.stats.norm.ppf`` evaluates (tests check the table
    against ``norm.ppf`` itself); ``scipy.special`` imports in a third of the time of
    ``scipy.stats``, and only on the first call (the table is cached)."""
    from scipy.special import ndtri

    return torch.from_numpy(ndtri(p.double().numpy())).float()


@functools.lru_cache(maxsize=None)
def _nf4_cpu() -> torch.Tensor:
    # float32 linspaces (torch's default dtype), quantiles in float64 rounded to float32, as
    # bitsandbytes' scipy.stats.norm.ppf gives them for a float32 array (test_codebooks checks
    # the table bit for bit against bitsandbytes and against norm.ppf).
    positive = _ppf(torch.linspace(_NF4_OFFSET, 0.5, 9)[:-1]).tolist()
    negative = (-_ppf(torch.linspace(_NF4_OFFSET, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32)
    values = values.sort().values
    return values / values.max()


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, float32, sorted ascending from -1.0 to 1.0."""
    # Always a copy: the cached table must never be shared by (and written through) a weight.
    return _nf4_cpu().to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_cpu(signed: bool = True) -> torch.Tensor:
    # 7 exponent bits of a decimal tree. Signed: 1 sign bit, 2**i fractions per
    # exponent i, mirrored. Unsigned (second Adam moment, never negative): the
    # sign bit becomes one more fraction bit, 2**(i+1) fractions per exponent.
    exponent_bits = 7
    values: list[float] = []
    for i in range(exponent_bits):
        fractions = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, fractions + 1)  # float32
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = means * (10.0 ** (i - (exponent_bits - 1)))
        values += scaled.tolist() + ((-scaled).tolist() if signed else [])
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None, signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic quantization map: 256 float32 values, sorted.

    ``signed=True`` (default): from -0.99296875 to 1.0, for double quantization
    and Adam's first moment. ``signed=False``: from 0.0 to 1.0, for Adam's
    second moment (bitsandbytes' ``create_dynamic_map(signed=False)``)."""
    code = _dynamic_cpu(bool(signed))
    return code.to(device, copy=True)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries for nearest-code rounding of a sorted codebook,
    computed in float32 as bitsandbytes does: ``(code[i] + code[i+1]) / 2``.
    A value equal to a boundary rounds to the lower code."""
    code = code.float()
    return (code[:-1] + code[1:]) / 2
