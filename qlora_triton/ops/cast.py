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
    would carry into the sign bit and give -0.0, and a NaN with only low
    payload bits would truncate to Inf. So a NaN (any payload, either sign)
    skips the rounding and gets the quiet bit set instead: its sign and the
    top of its payload are kept, and it stays a NaN.

    Cost on sm_90 (a compile-time SASS count of the scripts/sm90_compile.py
    variants, Triton 3.9, 2026-12-04): an FSETP.NAN and a predicated LOP3 per
    element, 2.0 to 3.75 instructions per element in all over the plain bit
    trick (GEMM epilogue 2.0, 8-bit dequantize 2.25, NF4 dequantize 3.75);
    main loops unchanged. An integer test ``(bits & 0x7FFFFFFF) > 0x7F800000``
    compiled to more, and selecting a constant 0x7FC0 made LLVM narrow the
    select to 16 bits and add a PRMT per element."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # ``x != x`` is true exactly for NaN (an unordered compare).
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
