"""Quantize kernels: NF4 (4-bit, blockwise absmax) and blockwise 8-bit against
a 256-entry codebook (the second level of double quantization, and 8-bit
optimizer states).

Rounding follows bitsandbytes exactly: a full block is scaled by
``x * (1 / absmax)``, the partial last block by ``x / absmax``; the code index
is the number of codebook midpoints strictly below the scaled value (nearest
code, a tie goes to the lower code).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..codebooks import midpoints, nf4_codebook

from ..backend import INTERPRET

# Elements one program quantizes: enough independent loads per GPU program; the
# interpreter steps through programs one by one in Python, so there a tile 16x
# larger cuts the CI time of a 1024x1024 weight from 3.5 s to well under 1 s.
# Only the tile size differs; the kernel code is the same.
_TILE = 65536 if INTERPRET else 4096


@triton.jit
def _nf4_quantize_kernel(
    # pointers
    x_ptr,          # [n] fp32/fp16/bf16, the flattened weight
    bounds_ptr,     # fp32 [15], midpoints of the NF4 codebook
    packed_ptr,     # uint8 [(n + 1) // 2], out
    absmax_ptr,     # fp32 [nblocks], out
    # sizes
    n,
    nblocks,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    pair = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index
    first = 2 * pair
    # Odd n: the missing last element reads as 0.0, which is NF4 index 7.
    hi = tl.load(x_ptr + first, mask=first < n, other=0.0).to(tl.float32)
    lo = tl.load(x_ptr + first + 1, mask=first + 1 < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(hi), axis=1), tl.max(tl.abs(lo), axis=1))
    partial = (block + 1) * BLOCKSIZE > n
    # The clamp is an fp32 tensor, not the literal 1e-38: below fp32's smallest
    # normal, Triton 3.6 types that literal fp64 and div_rn then fails to compile.
    safe = tl.maximum(absmax, tl.full([BLOCKS_PER_PROG], 1e-38, tl.float32))
    inv = tl.div_rn(tl.full([BLOCKS_PER_PROG], 1.0, tl.float32), safe)
    hi_s = tl.where(partial[:, None], tl.div_rn(hi, safe[:, None]), hi * inv[:, None])
    lo_s = tl.where(partial[:, None], tl.div_rn(lo, safe[:, None]), lo * inv[:, None])
    hi_s = tl.minimum(tl.maximum(hi_s, -1.0), 1.0)
    lo_s = tl.minimum(tl.maximum(lo_s, -1.0), 1.0)
    hi_q = tl.zeros_like(pair)
    lo_q = tl.zeros_like(pair)
    for i in tl.static_range(15):
        bound = tl.load(bounds_ptr + i)
        hi_q += (hi_s > bound).to(tl.int32)
        lo_q += (lo_s > bound).to(tl.int32)
    byte = ((hi_q << 4) | lo_q).to(tl.uint8)
    tl.store(packed_ptr + pair, byte, mask=first < n)
    # bitsandbytes stores the clamped absmax for the partial block only.
    tl.store(absmax_ptr + block, tl.where(partial, safe, absmax), mask=block < nblocks)


@triton.jit
def nearest_code_256(scaled, bounds_ptr):
    """Index (int32) of the nearest of 256 sorted codes, a tie going to the lower
    one: the number of the 255 midpoints at ``bounds_ptr`` strictly below
    ``scaled``, found by an 8-step binary search."""
    q = tl.zeros(scaled.shape, tl.int32)
    for step in tl.static_range(8):
        probe = q + (128 >> step)
        q = tl.where(scaled > tl.load(bounds_ptr + probe - 1), probe, q)
    return q


@triton.jit
def _blockwise_8bit_quantize_kernel(
    # pointers
    x_ptr,          # [n] fp32/fp16/bf16
    bounds_ptr,     # fp32 [255], midpoints of the sorted 256-entry codebook
    q_ptr,          # uint8 [n], out
    absmax_ptr,     # fp32 [nblocks], out
    # sizes
    n,
    nblocks,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.maximum(absmax, tl.full([BLOCKS_PER_PROG], 1e-38, tl.float32))  # fp32, see above
    inv = tl.div_rn(tl.full([BLOCKS_PER_PROG], 1.0, tl.float32), safe)
    q = nearest_code_256(x * inv[:, None], bounds_ptr)
    tl.store(q_ptr + idx, q.to(tl.uint8), mask=idx < n)
    tl.store(absmax_ptr + block, absmax, mask=block < nblocks)


@functools.lru_cache(maxsize=None)
def _nf4_bounds(device: torch.device) -> torch.Tensor:
    return midpoints(nf4_codebook()).to(device)


def _check_flat(name: str, x: torch.Tensor) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(x.shape)}")
    if x.numel() >= 2**31:
        raise ValueError(f"{name} has {x.numel()} elements; at most 2**31 - 1 are supported")


def check_launch_extent(name: str, n: int, programs: int, tile: int) -> None:
    """Element offsets in the kernels are int32, and the masked lanes of the last
    program compute theirs too: past 2**31 one would wrap negative and pass an
    ``idx < n`` mask (a write before the tensor). So ``programs`` programs of
    ``tile`` elements must stay below 2**31, which costs at most one tile of
    the 2**31 - 1 limit."""
    if programs * tile >= 2**31:
        raise ValueError(f"{name} has {n} elements; the last {tile}-element tile of this kernel would reach "
                         f"offset {programs * tile}, past int32: at most {2**31 - tile} elements are supported")


def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch NF4 quantization of a flat weight; returns ``(packed, absmax)``."""
    _check_flat("x", x)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    per_prog = max(1, _TILE // blocksize)
    grid = (triton.cdiv(nblocks, per_prog),)
    check_launch_extent("x", n, grid[0], per_prog * blocksize)
    _nf4_quantize_kernel[grid](x, _nf4_bounds(x.device), packed, absmax, n, nblocks,
                               BLOCKSIZE=blocksize, BLOCKS_PER_PROG=per_prog)
    return packed, absmax


def blockwise_8bit_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch blockwise 8-bit quantization against a sorted 256-entry ``code``;
    returns ``(q uint8 [n], absmax fp32 [nblocks])``."""
    _check_flat("x", x)
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    per_prog = max(1, _TILE // blocksize)
    grid = (triton.cdiv(nblocks, per_prog),)
    check_launch_extent("x", n, grid[0], per_prog * blocksize)
    _blockwise_8bit_quantize_kernel[grid](x, midpoints(code).to(x.device), q, absmax, n, nblocks,
                                          BLOCKSIZE=blocksize, BLOCKS_PER_PROG=per_prog)
    return q, absmax
