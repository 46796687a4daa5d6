"""The NF4 decode, shared by every kernel that reads a packed weight: ``@triton.jit``
helpers that turn packed bytes (or int32 words of them) and the (double-quantized)
block scales into fp32 values in registers. No kernel here: the kernel families
(:mod:`.gemv`, :mod:`.gemm`, :mod:`.grad_input`, :mod:`.dequantize`) build on them.

Element ``(n, k)`` of W [N, K] is flat index ``n * K + k``: byte ``idx // 2`` (high
nibble first), scale block ``idx // blocksize``. When ``K % blocksize == 0`` every
row starts on a 32-bit word, and a K tile of ``BLOCK_K <= blocksize`` columns
lies in one block of each row: the word helpers read int32 words and decode them
with a register codebook (one shuffle per weight, one scale per row segment;
:func:`nf4_x_pieces` and :func:`nf4_w_fragment`: a scale per 32-column piece,
any blocksize). Otherwise :func:`nf4_w_tile` finds every element's byte and block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..weight import NF4Weight


@triton.jit
def nf4_scale_raw(absmax_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """The stored scale of each block in ``block``: the uint8 code (double
    quantization) or the fp32 absmax; the one load a kernel issues ahead
    (:func:`nf4_scale_of` finishes it)."""
    if DOUBLE_QUANT:
        return tl.load(absmax_ptr + block, mask=mask, other=0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_scale_of(raw, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                 DOUBLE_QUANT: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """The fp32 scale from :func:`nf4_scale_raw`'s value: with double
    quantization ``code2[q] * absmax2[block // BLOCKSIZE2] + offset``."""
    if DOUBLE_QUANT:
        nested = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.load(code2_ptr + raw.to(tl.int32)) * nested + tl.load(offset_ptr)
    else:
        return raw


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
    raw = nf4_scale_raw(absmax_ptr, block, mask, DOUBLE_QUANT)
    return nf4_scale_of(raw, absmax2_ptr, code2_ptr, offset_ptr, block, mask, DOUBLE_QUANT,
                        BLOCKSIZE2)


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
    return tl.gather(tl.broadcast_to(table[None, :], (nibble.shape[0], 32)), nibble, 1)


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
def nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
               rn, rk, N, K,
               BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W[rn, rk] in fp32 for any K (``rn`` [BLOCK_N], ``rk`` [BLOCK_K] indices):
    every element finds its own byte and block; out-of-range elements are 0.0."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    idx = rn[:, None] * K + rk[None, :]
    # Masked elements decode to code[7] * 0 = 0.0, so they add nothing to a dot.
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx // BLOCKSIZE, mask,
                      DOUBLE_QUANT, BLOCKSIZE2)
    return nf4_code(packed_ptr, code_ptr, idx, mask) * scale


@triton.jit
def nf4_x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
             offset_ptr, rm, rn, k_start, k_end, M, N, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
             DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``x[rm, k_start:k_end] @ W[rn, k_start:k_end].T`` for any K (the
    per-element decode of :func:`nf4_w_tile`); the general GEMM and GEMV differ
    only in their K range."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       rn, rk, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def nf4_x_f32(x):
    """``x`` in fp32; bf16 by its bits (a bf16 is the upper half of its fp32:
    one shift or mask, where the cast takes a byte permute and a shift for a
    register's upper bf16). Exact, NaN payloads and Inf included."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _nf4_x_word(table, word, xw, p):
    """``p`` plus the 8 products of one word per lane: ``word`` [R, 32] uint32
    (nf4_decode_words' nibble order), ``xw`` [ROWS, 32, 8] its columns of x,
    ``p`` fp32 [ROWS, R, 32]. Each code is looked up right before its product,
    so that one code tensor is live at a time."""
    ROWS: tl.constexpr = xw.shape[0]
    even, odd = tl.split(tl.reshape(xw, (ROWS, 32, 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    p += nf4_lookup(table, (word >> 4) & 15)[None] * nf4_x_f32(x0)[:, None]
    p += nf4_lookup(table, word & 15)[None] * nf4_x_f32(x1)[:, None]
    p += nf4_lookup(table, (word >> 12) & 15)[None] * nf4_x_f32(x2)[:, None]
    p += nf4_lookup(table, (word >> 8) & 15)[None] * nf4_x_f32(x3)[:, None]
    p += nf4_lookup(table, (word >> 20) & 15)[None] * nf4_x_f32(x4)[:, None]
    p += nf4_lookup(table, (word >> 16) & 15)[None] * nf4_x_f32(x5)[:, None]
    p += nf4_lookup(table, word >> 28)[None] * nf4_x_f32(x6)[:, None]
    p += nf4_lookup(table, (word >> 24) & 15)[None] * nf4_x_f32(x7)[:, None]
    return p


@triton.jit
def nf4_x_pieces(table, words, x):
    """``sum_k W[n, k] * x[m, k]`` over each lane's 32-column piece: ``words``
    [R, 4, 32] uint32 (R rows per lane, the piece's 4 words, 32 lanes; see
    nf4_decode_words), ``x`` [ROWS, 32, 4, 8] (row of x, lane, word, column
    within the word) -> fp32 [ROWS, R, 32], before the block scale (a piece
    lies in one block). The codebook gather runs along the lane axis (one
    shuffle per weight); the sums stay in the lane, each one chain of 32
    multiply-adds (the words split apart in registers, no adds across them)."""
    ROWS: tl.constexpr = x.shape[0]
    R: tl.constexpr = words.shape[0]
    # The word axis last, split in two twice: word 2a + b.
    wa, wb = tl.split(tl.reshape(tl.permute(words, (0, 2, 1)), (R, 32, 2, 2)))
    w0, w2 = tl.split(wa)
    w1, w3 = tl.split(wb)
    xa, xb = tl.split(tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, 32, 8, 2, 2)))
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    # -0.0: the first add folds away (x + -0.0 == x), leaving one multiply.
    p = tl.full((ROWS, R, 32), -0.0, tl.float32)
    p = _nf4_x_word(table, w0, x0, p)
    p = _nf4_x_word(table, w1, x1, p)
    p = _nf4_x_word(table, w2, x2, p)
    return _nf4_x_word(table, w3, x3, p)


@triton.jit
def nf4_w_words_tile(table, words):
    """The codes of ``words`` [KW, BLOCK_N] as the W tile [BLOCK_N, 8 * KW] fp32
    (unscaled), built in registers for the dot's A operand."""
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_decode_words(table, words)
    # join stacks on a new last axis: [KW, BLOCK_N, a, b, c] with i = 4a + 2b + c.
    w = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    w = tl.permute(w, (1, 0, 2, 3, 4))
    return tl.reshape(w, (words.shape[1], 8 * words.shape[0]))


@triton.jit
def nf4_w_fragment(table, words, scale, DTYPE: tl.constexpr):
    """The scaled W tile [BLOCK_N, 128] in ``DTYPE``, in the wgmma A
    fragment's lanes, from ``words`` uint32 [4, 32, BLOCK_N / 16, 2] (word of
    a lane's run, lane, 16-row group, row bit 3) and ``scale`` fp32 [32,
    BLOCK_N / 16, 2] (the run's): row ``16 g + 8 r3 + lane / 4``; column k of
    the run's 32 (``8 a + p``: word a, element p) of lane l is k = (a1, a0,
    p2, p1, l % 4, p0) as bits from the top (the fragment's k bits 1, 2 are
    the lane's; ops/gemv.py, _nf4_gemv_dot_kernel; :func:`nf4_fragment_k`
    orders x^T the same way). The codebook gather runs along the lanes (one
    shuffle per weight), the groups (warps lowest) next to them as Triton's
    gather layout has them; every other step only relabels a lane's
    registers."""
    G: tl.constexpr = words.shape[2]
    X: tl.constexpr = 8 * G
    # (a, r3, g, lane): the gather's rows, the warps' group bits lowest.
    wl = tl.reshape(tl.permute(words, (0, 3, 2, 1)), (X, 32))
    s = tl.broadcast_to(tl.permute(scale, (2, 1, 0))[None], (4, 2, G, 32))
    s = tl.reshape(s, (X, 32))
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_decode_words(table, wl)
    # join stacks on a new last axis: [X, 32, p2, p1, p0] with p = 4 p2 + 2 p1 + p0.
    if DTYPE == tl.bfloat16:
        # bf16 has fp32's range: the scale multiplies the codes already
        # packed in x's dtype (one bf16x2 multiply per 2 weights instead of an
        # fp32 multiply per weight; the tile is rounded to bf16 either way).
        # fp16 (underflow below 6e-5) and fp32 multiply in fp32.
        c0, c1, c2, c3, c4, c5, c6, c7, s = (
            c0.to(DTYPE), c1.to(DTYPE), c2.to(DTYPE), c3.to(DTYPE), c4.to(DTYPE), c5.to(DTYPE),
            c6.to(DTYPE), c7.to(DTYPE), s.to(DTYPE))
    w = tl.join(tl.join(tl.join((c0 * s).to(DTYPE), (c4 * s).to(DTYPE)),
                        tl.join((c2 * s).to(DTYPE), (c6 * s).to(DTYPE))),
                tl.join(tl.join((c1 * s).to(DTYPE), (c5 * s).to(DTYPE)),
                        tl.join((c3 * s).to(DTYPE), (c7 * s).to(DTYPE))))
    w = tl.reshape(w, (2, 2, 2, G, 8, 2, 2, 2, 2, 2))
    # (a1, a0, r3, g, lane / 4, q1, q0, p2, p1, p0) -> (rows: g, r3, lane / 4;
    # k: a1, a0, p2, p1, q1, q0, p0).
    w = tl.permute(w, (3, 2, 4, 0, 1, 7, 8, 5, 6, 9))
    return tl.reshape(w, (16 * G, 128))


@triton.jit
def nf4_fragment_k(x):
    """x [16, 4, 32] (row of x, lane % 4, the lane's run: physical columns)
    -> x^T [128, 16] in the K order of :func:`nf4_w_fragment`."""
    x = tl.reshape(x, (16, 2, 2, 2, 2, 2, 2, 2))  # (m, q1, q0, a1, a0, p2, p1, p0)
    x = tl.permute(x, (3, 4, 5, 6, 1, 2, 7, 0))
    return tl.reshape(x, (128, 16))


@triton.jit
def nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn, k0,
                        N, K, stride_wn, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K] in fp32 from int32 words of packed bytes, for
    K % BLOCKSIZE == 0 and BLOCK_K <= BLOCKSIZE (so K % BLOCK_K == 0): one row
    per lane, its scale (one per row segment) multiplied in once. Rows past N
    read word 0: finite values whose products the callers mask or zero."""
    rw = tl.arange(0, BLOCK_K // 8)
    row_ok = rn < N
    words = tl.load(words_ptr + rn[None, :] * stride_wn + k0 // 8 + rw[:, None],
                    mask=row_ok[None, :], other=0)
    w = nf4_w_words_tile(table, words.to(tl.uint32, bitcast=True))
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, BLOCKSIZE2)
    return w * scale[:, None]


@triton.jit
def grouped_tile(pid, tiles_m, tiles_other, GROUP_M: tl.constexpr):
    """``(pid_m, pid_other)`` of program ``pid`` in grouped order: GROUP_M row
    tiles walk the other axis together, so each W tile decoded from L2 serves
    GROUP_M programs close in time."""
    per_group = GROUP_M * tiles_other
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

def scale_args(qw: NF4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four scale pointers a kernel takes (``absmax`` stands in for the
    unused nested ones, which the DOUBLE_QUANT=False branch never reads)."""
    if qw.double_quant:
        return qw.absmax, qw.absmax2, qw.code2, qw.offset
    return qw.absmax, qw.absmax, qw.absmax, qw.absmax
