"""Dequantize kernels: NF4 (the "dequant" strategy's first half, and
``dequantize_nf4``) and blockwise 8-bit (the paged optimizer's states). The
decode itself is :mod:`.decode`'s, shared with the matmul kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..weight import NF4Weight
from .cast import cast_rtne
from .decode import nf4_scale, scale_args
from .quantize import check_launch_extent

from ..backend import INTERPRET

# Rows of ROW = min(64, blocksize) elements per program; larger under the
# interpreter, which runs programs one at a time in Python.
_ROWS = 8192 if INTERPRET else 256
_NUM_WARPS = 4
# How the kernel lays its global loads and stores over the lanes, named for the
# static profile's L1/TEX description (scripts/sm90_sass.py, access_lines).
L1_LAYOUT = {"_nf4_dequantize_kernel": "rows"}


@triton.jit
def _nf4_dequantize_kernel(
    # pointers
    packed_ptr,     # uint8 [nbytes]
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    out_ptr,        # [n] fp32/fp16/bf16, out
    # sizes
    n,              # elements
    nbytes,         # packed bytes, (n + 1) // 2
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Each row is ROW consecutive elements inside one quantization block: its
    # ROW // 2 bytes load as vectors (the mask is constant along a row when
    # nbytes is a multiple of 16, as for every real layer), its scale is loaded
    # once, and its ROW outputs (high and low nibbles interleaved in registers)
    # store as vectors.
    ROW: tl.constexpr = 64 if BLOCKSIZE > 64 else BLOCKSIZE
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bidx = row[:, None] * (ROW // 2) + tl.arange(0, ROW // 2)[None, :]
    byte = tl.load(packed_ptr + bidx, mask=bidx < nbytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 0xF))
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row * ROW // BLOCKSIZE,
                      row * ROW < n, DOUBLE_QUANT, BLOCKSIZE2)
    w = tl.reshape(tl.join(hi, lo), (ROWS, ROW)) * scale[:, None]  # element 2j: the high nibble
    idx = row[:, None] * ROW + tl.arange(0, ROW)[None, :]
    tl.store(out_ptr + idx, cast_rtne(w, out_ptr.dtype.element_ty), mask=idx < n)


@triton.jit
def _blockwise_8bit_dequantize_kernel(
    q_ptr,          # uint8 [n]
    code_ptr,       # fp32 [256]
    absmax_ptr,     # fp32 [nblocks]
    out_ptr,        # [n] fp32/fp16/bf16, out
    n,
    BLOCKSIZE: tl.constexpr,
    TILE: tl.constexpr,
):
    idx = tl.program_id(0) * TILE + tl.arange(0, TILE)
    mask = idx < n
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.int32)
    x = tl.load(code_ptr + q) * tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + idx, cast_rtne(x, out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize(qw: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch NF4 dequantization; returns a dense tensor of ``qw.shape``:
    ``out`` (contiguous, ``dtype``, on qw's device) when given, else a new one."""
    n = qw.numel
    if out is None:
        out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    row = min(64, qw.blocksize)
    grid = (triton.cdiv(triton.cdiv(n, row), _ROWS),)
    check_launch_extent("qw", n, grid[0], _ROWS * row)
    _nf4_dequantize_kernel[grid](qw.packed, qw.code, *scale_args(qw), out, n, (n + 1) // 2,
                                 BLOCKSIZE=qw.blocksize, BLOCKSIZE2=qw.blocksize2,
                                 DOUBLE_QUANT=qw.double_quant, ROWS=_ROWS, num_warps=_NUM_WARPS)
    return out


def blockwise_8bit_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Launch blockwise 8-bit dequantization; returns a flat tensor of ``dtype``."""
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    tile = 65536 if INTERPRET else 4096
    check_launch_extent("q", n, triton.cdiv(n, tile), tile)
    _blockwise_8bit_dequantize_kernel[(triton.cdiv(n, tile),)](q, code, absmax, out, n,
                                                               BLOCKSIZE=blocksize, TILE=tile)
    return out
