"""``@triton.jit`` helpers shared by every kernel family."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` as torch's ``.to()`` does: round to nearest
    even, NaN stays NaN, Inf stays Inf, overflow rounds to Inf.

    For bf16 the rounding is done on the bits: Triton 3.9's interpreter
    truncates an fp32 -> bf16 ``.to()`` (and its "rtne" mode mishandles
    carries), which made interpreted bf16 outputs differ from torch's by one
    ulp. The bit trick is exact on every backend, so the GPU runs it too.

    The rounding add carries into the exponent, which is right for finite
    values (the largest ones round to Inf, as in torch) but turns a NaN whose
    mantissa is all ones into a zero: the GPU's canonical NaN ``0x7FFFFFFF``
    would carry into the sign bit and give -0.0. NaN (any payload, either
    sign) therefore selects bf16's quiet NaN ``0x7FC0`` instead, as torch's
    scalar conversion does."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # ``x != x`` is true exactly for NaN (an unordered compare).
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
