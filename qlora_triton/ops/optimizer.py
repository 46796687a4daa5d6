"""The fused AdamW step: one Triton kernel for the 32-bit and the 8-bit state
variants (a ``tl.constexpr`` switch), and its launcher.

Per element, in the order of ``torch.optim.AdamW`` (single-tensor path):

    p  = p * (1 - lr * wd)                    decoupled weight decay
    m  = lerp(m, g, 1 - beta1)                as torch: one fma
    v  = v * beta2 + (1 - beta2) * g * g
    p  = p + (-step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)

in fp32 whatever the parameter dtype (bf16/fp16 parameters are loaded, updated
in fp32 and rounded once, to nearest even). Square root and divisions are the
correctly rounded ones (``sqrt_rn``, ``div_rn``), as on torch's CPU.

8-bit variant (bitsandbytes' blockwise 8-bit optimizer format): ``m`` and ``v``
are uint8 codes into the signed / unsigned 8-bit dynamic maps with one fp32
absmax per 256 consecutive elements. The kernel dequantizes
(``code[q] * absmax``), updates the parameter with the fp32 moments, then
requantizes them: new absmax per block, nearest code of ``x * (1 / absmax)``
by binary search over the codebook midpoints (as ops/quantize.py). A program
owns whole 256-blocks, so the absmax reduction never crosses programs.

A NaN or Inf gradient element costs that element only, as in torch's AdamW:
its parameter becomes NaN, and its 8-bit moments are stored as 0 (8 bits hold
no NaN; any other code would keep moving a repaired parameter), while the rest
of its block keeps finite moments and scale. The rule is on the moments: any
moment element that is not finite after the update is stored as 0, so a
finite gradient so large that its second moment overflows fp32 (about
|g| > 6e20 at beta2 = 0.999) loses that moment the same way. The reference does the same. When a
``nonfinite`` flag is passed, the 8-bit kernel sets it to 1 if that happened
anywhere (qlora_triton.optim warns once from it, without a device sync).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..adamw_scalars import STATE_BLOCKSIZE, AdamWScalars
from ..backend import INTERPRET
from ..codebooks import dynamic_map, midpoints
from .cast import cast_rtne
from .quantize import check_launch_extent, nearest_code_256

QBLOCK = STATE_BLOCKSIZE  # elements per absmax block of the 8-bit moments

# Elements one program updates. On the GPU 4096 (16 absmax blocks) keeps enough
# loads in flight; the interpreter steps through programs one by one in Python,
# so there one program takes up to 2**20 elements (a 1024x4097 parameter: 5
# programs instead of 1025), shrunk to the parameter so that a small one does not
# compute a mostly masked 2**20 tile. Only the tile size differs; the kernel
# code is the same.
_TILE = 2**20 if INTERPRET else 4096
# Warps per program on the GPU (the interpreter ignores it). With Triton's
# default 4, a 4096-element program holds 32 elements of p, g, m, v per thread:
# compiled for sm_90 with fp32 params it hits 255 registers and spills 12 B
# (32-bit) / 72 B (8-bit) on Triton 3.6 (scripts/sm90_compile.py).
_NUM_WARPS = 8


@triton.jit
def _dequantize_moment(codes_ptr, absmax_ptr, code_ptr, idx, block, mask, block_mask):
    q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
    return tl.load(code_ptr + q) * absmax[:, None]


@triton.jit
def _quantize_moment(x, finite, codes_ptr, absmax_ptr, bounds_ptr, idx, block, mask, block_mask):
    # x: fp32 [blocks, QBLOCK], 0.0 in masked lanes. A NaN/Inf element (from a
    # NaN/Inf gradient; its parameter element is NaN by now) is stored as 0, so
    # that it neither spoils its block's absmax nor moves a repaired parameter.
    x = tl.where(finite, x, 0.0)
    absmax = tl.max(tl.abs(x), axis=1)
    # An fp32 clamp, not the literal 1e-38 (subnormal in fp32: Triton 3.6 types
    # it fp64 and div_rn then fails to compile).
    safe = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe)
    q = nearest_code_256(x * inv[:, None], bounds_ptr)
    tl.store(codes_ptr + idx, q.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, absmax, mask=block_mask)


@triton.jit
def _adamw_step_kernel(
    # pointers
    param_ptr,              # [n] fp32/bf16/fp16, updated in place
    grad_ptr,               # [n] the param's dtype
    exp_avg_ptr,            # [n] fp32 (32-bit) or uint8 codes (8-bit), updated in place
    exp_avg_sq_ptr,         # [n] fp32 (32-bit) or uint8 codes (8-bit), updated in place
    exp_avg_absmax_ptr,     # fp32 [cdiv(n, QBLOCK)], updated in place (8-bit only)
    exp_avg_sq_absmax_ptr,  # fp32 [cdiv(n, QBLOCK)], updated in place (8-bit only)
    signed_code_ptr,        # fp32 [256] signed dynamic map, for exp_avg (8-bit only)
    signed_bounds_ptr,      # fp32 [255] its midpoints
    unsigned_code_ptr,      # fp32 [256] unsigned dynamic map, for exp_avg_sq (8-bit only)
    unsigned_bounds_ptr,    # fp32 [255] its midpoints
    nonfinite_ptr,          # int32 [1]: set to 1 when a moment element was stored as 0 (REPORT only)
    # scalars, computed on the host (AdamWScalars)
    decay,                  # 1 - lr * weight_decay
    beta1_weight,           # 1 - beta1, the lerp weight
    beta2,
    beta2_weight,           # 1 - beta2
    neg_step_size,          # -lr / (1 - beta1**step)
    bias_correction2_sqrt,  # sqrt(1 - beta2**step)
    eps,
    # sizes
    n,
    # meta-parameters
    QBLOCK: tl.constexpr,             # elements per absmax block (8-bit)
    QBLOCKS_PER_PROG: tl.constexpr,   # absmax blocks one program owns
    EIGHT_BIT: tl.constexpr,          # moments as 8-bit codes + absmax, else fp32
    REPORT: tl.constexpr,             # 8-bit: flag a non-finite moment in nonfinite_ptr
):
    block = tl.program_id(0) * QBLOCKS_PER_PROG + tl.arange(0, QBLOCKS_PER_PROG)
    idx = block[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = idx < n
    block_mask = block * QBLOCK < n

    p = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if EIGHT_BIT:
        m = _dequantize_moment(exp_avg_ptr, exp_avg_absmax_ptr, signed_code_ptr, idx, block, mask, block_mask)
        v = _dequantize_moment(exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, unsigned_code_ptr, idx, block, mask,
                               block_mask)
        # Masked lanes read code 0 (-absmax for the signed map): zero them so the
        # new absmax covers real elements only and nothing there overflows.
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    else:
        m = tl.load(exp_avg_ptr + idx, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + idx, mask=mask, other=0.0)

    p = p * decay
    # torch's lerp: start + w * (end - start) for w < 0.5, else end + (w - 1) * (end - start).
    small = beta1_weight < 0.5
    m = tl.fma(tl.where(small, beta1_weight, beta1_weight - 1.0), g - m, tl.where(small, m, g))
    v = v * beta2 + beta2_weight * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    tl.store(param_ptr + idx, cast_rtne(p, param_ptr.dtype.element_ty), mask=mask)
    if EIGHT_BIT:
        # ``abs(x) < inf`` is false for NaN and +-Inf alike.
        m_finite = tl.abs(m) < float("inf")
        v_finite = tl.abs(v) < float("inf")
        _quantize_moment(m, m_finite, exp_avg_ptr, exp_avg_absmax_ptr, signed_bounds_ptr,
                         idx, block, mask, block_mask)
        _quantize_moment(v, v_finite, exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, unsigned_bounds_ptr,
                         idx, block, mask, block_mask)
        if REPORT:
            lost = tl.max(tl.where(m_finite & v_finite, 0, 1))
            tl.store(nonfinite_ptr, lost, mask=lost > 0)  # only ever 1: concurrent stores agree
    else:
        tl.store(exp_avg_ptr + idx, m, mask=mask)
        tl.store(exp_avg_sq_ptr + idx, v, mask=mask)


@functools.lru_cache(maxsize=None)
def _codebooks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
    return tuple(t.to(device) for t in (signed, midpoints(signed), unsigned, midpoints(unsigned)))


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               scalars: AdamWScalars, exp_avg_absmax: torch.Tensor | None = None,
               exp_avg_sq_absmax: torch.Tensor | None = None,
               nonfinite: torch.Tensor | None = None) -> None:
    """Launch one fused AdamW update, in place, of contiguous ``param`` and its
    moments. 32-bit: ``exp_avg`` / ``exp_avg_sq`` fp32 like ``param``.
    8-bit: they are uint8 codes like ``param`` and the absmax tensors are fp32
    ``[cdiv(numel, 256)]``; ``nonfinite`` (int32 ``[1]``, optional) is set to 1
    when a non-finite moment element is stored as 0, and left as it is
    otherwise. The caller (qlora_triton.optim) checks dtypes, devices and
    shapes."""
    n = param.numel()
    if n == 0:
        return
    if n >= 2**31:
        raise ValueError(f"param has {n} elements; at most 2**31 - 1 are supported")
    eight_bit = exp_avg.dtype == torch.uint8
    if eight_bit:
        absmax1, absmax2 = exp_avg_absmax, exp_avg_sq_absmax
    else:  # the 32-bit branch never reads these pointers
        absmax1 = absmax2 = exp_avg
    nblocks = triton.cdiv(n, QBLOCK)
    per_prog = _TILE // QBLOCK
    if INTERPRET:
        per_prog = min(per_prog, triton.next_power_of_2(nblocks))
    grid = (triton.cdiv(nblocks, per_prog),)
    check_launch_extent("param", n, grid[0], per_prog * QBLOCK)
    s = scalars
    report = eight_bit and nonfinite is not None
    _adamw_step_kernel[grid](
        param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, *_codebooks(param.device),
        nonfinite if report else absmax1,  # never written unless REPORT
        s.decay, 1 - s.beta1, s.beta2, 1 - s.beta2, -s.step_size, s.bias_correction2_sqrt, s.eps,
        n,
        QBLOCK=QBLOCK, QBLOCKS_PER_PROG=per_prog, EIGHT_BIT=eight_bit, REPORT=report,
        num_warps=_NUM_WARPS,
    )
