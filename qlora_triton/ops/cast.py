"""``@triton.jit`` helpers shared by every kernel family."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` rounding to nearest even, as torch does.

    For bf16 the rounding is done on the bits: Triton 3.9's interpreter
    truncates an fp32 -> bf16 ``.to()`` (and its "rtne" mode mishandles
    carries), which made interpreted bf16 outputs differ from torch's by one
    ulp. The bit trick is exact on every backend, so the GPU runs it too."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
