"""Dequantize kernels, and the ``@triton.jit`` helpers that decode NF4 codes and
(double-quantized) scales in registers; the matmul kernels reuse the helpers so
that no dense weight is ever written to memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..weight import NF4Weight
from .cast import cast_rtne

from ..backend import INTERPRET

# Bytes (element pairs) per program; larger under the interpreter, which runs
# programs one at a time in Python (see ops/quantize.py).
_PAIRS = 32768 if INTERPRET else 2048


@triton.jit
def nf4_scale(
    absmax_ptr,     # fp32 [nblocks], or uint8 [nblocks] when DOUBLE_QUANT
    absmax2_ptr,    # fp32 [ceil(nblocks / BLOCKSIZE2)] (DOUBLE_QUANT only)
    code2_ptr,      # fp32 [256] (DOUBLE_QUANT only)
    offset_ptr,     # fp32 [1] (DOUBLE_QUANT only)
    block,          # int tensor of block indices
    mask,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
):
    """The fp32 scale of each block in ``block``."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.load(code2_ptr + q) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_code(packed_ptr, code_ptr, idx, mask):
    """The NF4 codebook value (fp32) of flat element ``idx``: byte ``idx // 2``,
    high nibble for even ``idx``."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0x77).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
    return tl.load(code_ptr + nibble)


@triton.jit
def nf4_code_table(code_ptr):
    """The 16 codes twice over as a [32] fp32 register tensor: one code per lane,
    so that :func:`nf4_lookup` compiles to one warp shuffle per element."""
    return tl.load(code_ptr + (tl.arange(0, 32) & 15))


@triton.jit
def nf4_lookup(table, nibble):
    """``code[nibble]`` for a 2-D int tensor of nibbles, from the register table
    of :func:`nf4_code_table` (``tl.gather``: a shuffle on the GPU, no memory
    access)."""
    src = tl.broadcast_to(table[None, :], (nibble.shape[0], 32))
    return tl.gather(src, nibble, 1)


@triton.jit
def nf4_decode_words(table, words):
    """The 8 codes of each uint32 word of packed bytes (2-D ``words``; one row
    of W per lane keeps the lookups warp-local): ``c[i]`` is element ``8w + i``.
    Byte j of a word is bits 8j..8j+7 (little-endian) and holds elements 2j
    (high nibble) and 2j + 1."""
    c0 = nf4_lookup(table, (words >> 4) & 15)
    c1 = nf4_lookup(table, words & 15)
    c2 = nf4_lookup(table, (words >> 12) & 15)
    c3 = nf4_lookup(table, (words >> 8) & 15)
    c4 = nf4_lookup(table, (words >> 20) & 15)
    c5 = nf4_lookup(table, (words >> 16) & 15)
    c6 = nf4_lookup(table, words >> 28)
    c7 = nf4_lookup(table, (words >> 24) & 15)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _nf4_dequantize_kernel(
    # pointers
    packed_ptr,     # uint8 [(n + 1) // 2]
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    out_ptr,        # [n] fp32/fp16/bf16, out
    # sizes
    n,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PAIRS: tl.constexpr,
):
    pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
    first = 2 * pair
    mask = first < n
    byte = tl.load(packed_ptr + pair, mask=mask, other=0).to(tl.int32)
    # blocksize is even, so both elements of a byte share one block.
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first // BLOCKSIZE, mask,
                      DOUBLE_QUANT, BLOCKSIZE2)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + first, cast_rtne(hi, dtype), mask=mask)
    tl.store(out_ptr + first + 1, cast_rtne(lo, dtype), mask=first + 1 < n)


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


def scale_args(qw: NF4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four scale pointers a kernel takes (``absmax`` stands in for the
    unused nested ones, which the DOUBLE_QUANT=False branch never reads)."""
    if qw.double_quant:
        return qw.absmax, qw.absmax2, qw.code2, qw.offset
    return qw.absmax, qw.absmax, qw.absmax, qw.absmax


def nf4_dequantize(qw: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch NF4 dequantization; returns a dense tensor of ``qw.shape``:
    ``out`` (contiguous, ``dtype``, on qw's device) when given, else a new one."""
    n = qw.numel
    if out is None:
        out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    grid = (triton.cdiv((n + 1) // 2, _PAIRS),)
    _nf4_dequantize_kernel[grid](qw.packed, qw.code, *scale_args(qw), out, n,
                                 BLOCKSIZE=qw.blocksize, BLOCKSIZE2=qw.blocksize2,
                                 DOUBLE_QUANT=qw.double_quant, PAIRS=_PAIRS)
    return out


def blockwise_8bit_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Launch blockwise 8-bit dequantization; returns a flat tensor of ``dtype``."""
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    tile = 65536 if INTERPRET else 4096
    _blockwise_8bit_dequantize_kernel[(triton.cdiv(n, tile),)](q, code, absmax, out, n,
                                                               BLOCKSIZE=blocksize, TILE=tile)
    return out
