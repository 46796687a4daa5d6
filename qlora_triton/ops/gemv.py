"""The decode GEMVs (M <= 16, the "gemv" strategy): ``y = x @ W.T (+ bias)``
through a packed NF4 weight, memory-bound (the floor is the packed bytes and
scales at HBM bandwidth), K split across programs when the layer is narrow.

* ``_nf4_gemv_fma_kernel`` (M = 1, no tensor cores) and ``_nf4_gemv_dot_kernel``
  (2 <= M <= 16, tensor cores) for ``K % blocksize == 0``: int32 words, the
  register codebook, split epilogue of :mod:`.split`, a scale per 32
  columns (any blocksize). The FMA kernel reads whole 128-byte lines of each
  row per trip; the tensor-core one a row's 128 bytes per trip across the 4
  lanes of a quad, in the wgmma A fragment's lanes (K permuted inside a trip).
* ``_nf4_gemv_kernel`` for any other K: per-element decode, fp32 atomics into a
  zeroed output.

Each launcher takes its config from the one table, :mod:`.tuned_sm90`, through
:func:`.launch.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET, dot_in_fp32
from ..weight import NF4Weight
from .decode import (nf4_code_table, nf4_fragment_k, nf4_scale_of, nf4_scale_raw, nf4_w_fragment,
                     nf4_x_pieces, nf4_x_wt)
from .launch import dot_precision, launch
from .split import split_counter, split_epilogue
from .tuned_sm90 import (GEMV_FMA_MAX_M, autotune_enabled, general_config, general_configs,
                         gemv_config, gemv_configs, prune_gemv)

# Trips of loads each kernel issues ahead of its decode in registers (read by
# the static profile, scripts/sm90_sass.py, as part of its pipeline depth).
PREFETCH_TRIPS = {"_nf4_gemv_fma_kernel": 1, "_nf4_gemv_dot_kernel": 1}
# How each kernel's loop lays its global loads over the lanes, named for the
# static profile's L1/TEX description (scripts/sm90_sass.py, access_lines).
L1_LAYOUT = {"_nf4_gemv_fma_kernel": "lines", "_nf4_gemv_dot_kernel": "fragment"}


@triton.jit
def _lora_rows(h_ptr, b_ptr, rm, rn, M, N, R, stride_hm, stride_bn, stride_br):
    """fp32 ``(h @ B.T)[rm, rn]`` as [len(rm), len(rn)]: the LoRA update of a
    few rows, 16 ranks at a time (broadcast products, summed in fp32)."""
    out = tl.zeros((rm.shape[0], rn.shape[0]), dtype=tl.float32)
    rr = tl.arange(0, 16)
    for r0 in range(0, R, 16):
        h = tl.load(h_ptr + rm[:, None] * stride_hm + (r0 + rr)[None, :],
                    mask=(rm[:, None] < M) & ((r0 + rr) < R)[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                    mask=(rn[:, None] < N) & ((r0 + rr) < R)[None, :], other=0.0).to(tl.float32)
        out += tl.sum(h[:, None, :] * b[None, :, :], axis=2)
    return out


@triton.jit
def _lora_cols(h_ptr, b_ptr, rm, rn, M, N, R, stride_hm, stride_bn, stride_br,
               DOT_FP32: tl.constexpr):
    """fp32 ``(h @ B.T).T[rn, rm]`` as [len(rn), len(rm)] (the dot GEMV's
    transposed tile): ``B[rn] @ h[rm].T``, 16 ranks per tensor-core step."""
    out = tl.zeros((rn.shape[0], rm.shape[0]), dtype=tl.float32)
    rr = tl.arange(0, 16)
    for r0 in range(0, R, 16):
        b = tl.load(b_ptr + rn[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                    mask=(rn[:, None] < N) & ((r0 + rr) < R)[None, :], other=0.0)
        ht = tl.load(h_ptr + rm[None, :] * stride_hm + (r0 + rr)[:, None],
                     mask=(rm[None, :] < M) & ((r0 + rr) < R)[:, None], other=0.0)
        if DOT_FP32:
            out += tl.dot(b.to(tl.float32), ht.to(tl.float32), input_precision="ieee")
        else:
            out += tl.dot(b, ht)
    return out


@triton.jit
def _fma_trip_loads(w_ptrs, absmax_ptr, s_base, k, k_end, col, row_ok, BLOCK_K: tl.constexpr,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr):
    """The FMA GEMV's words [4, 32, RPLANE] and stored scales [32, RPLANE] of
    the trip at column ``k``. EVEN_K: unmasked, ``k`` clamped to the split's
    last trip. Otherwise masked per piece: a piece is all in or all out (K %
    32 == 0), so the mask is constant along its 4 words and the load stays
    128-bit; masked words read 0 (code -1.0: their x is 0, or their row is not
    stored), masked scales 0."""
    if EVEN_K:
        # k_end is a multiple of BLOCK_K here; say so, or the loads lose
        # their 128-bit width (Triton would only know 16 | K).
        k = tl.multiple_of(tl.minimum(k, k_end - BLOCK_K), BLOCK_K)
        words = tl.load(w_ptrs + k // 8)
        raw = tl.load(absmax_ptr + s_base + k // BLOCKSIZE)
    else:
        ok = row_ok & (k + col < k_end)[:, None]
        words = tl.load(w_ptrs + k // 8, mask=ok[None], other=0)
        raw = nf4_scale_raw(absmax_ptr, s_base + k // BLOCKSIZE, ok, DOUBLE_QUANT)
    return words, raw


@triton.jit
def _fma_scale(raw, absmax2_ptr, code2_ptr, offset, s_idx, DOUBLE_QUANT: tl.constexpr,
               BLOCKSIZE2: tl.constexpr):
    """nf4_scale_of for the unmasked FMA GEMV: ``offset`` loaded once, the
    nested index of the (non-negative) block an unsigned shift."""
    if DOUBLE_QUANT:
        nested = tl.load(absmax2_ptr + s_idx.to(tl.uint32) // BLOCKSIZE2)
        return tl.load(code2_ptr + raw.to(tl.int32)) * nested + offset
    else:
        return raw


@triton.jit
def _fragment_dot(table, words, scale, x, acc, DOT_FP32: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """``acc + W @ x^T`` over one run of each lane (128 columns of each row):
    ``words`` [4, 32, BLOCK_N / 16, 2] and ``scale`` as
    :func:`.decode.nf4_w_fragment` takes them, x [16, 4, 32] the same
    physical columns; the decoded tile is the dot's A operand in registers."""
    xt = nf4_fragment_k(x)
    if DOT_FP32:
        w = nf4_w_fragment(table, words, scale, tl.float32)
        return tl.dot(w, xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
    w = nf4_w_fragment(table, words, scale, x.dtype)
    return tl.dot(w, xt, acc, input_precision=DOT_PRECISION)


@triton.jit
def _nf4_gemv_fma_kernel(
    # pointers
    x_ptr,          # [M, K] fp32/fp16/bf16 (any strides), M <= ROWS
    words_ptr,      # int32 [N * K // 8]: the packed bytes read 4 at a time
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    bias_ptr,       # [N] (any stride; read only when HAS_BIAS)
    y_ptr,          # [M, N] x's dtype, out (contiguous)
    partial_ptr,    # fp32 [SPLIT_K, M, N] scratch (SPLIT_K > 1 only)
    count_ptr,      # int32 [cdiv(N, BLOCK_N)], zero on entry and on exit (SPLIT_K > 1 only)
    h_ptr,          # [M, R] x's dtype: x @ lora_A.T (read only when HAS_LORA)
    lora_b_ptr,     # [N, R] x's dtype: lora_B (any strides; read only when HAS_LORA)
    scaling,        # fp32: the LoRA scale
    # sizes
    M, N, K, R,     # R: the LoRA rank
    # strides
    stride_wn,      # K // 8: words per row of W
    stride_xm, stride_xk, stride_b,
    stride_hm, stride_bn, stride_br,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,     # add scaling * h @ lora_B.T (the LoRA update, folded)
    ROWS: tl.constexpr,         # power of two >= M
    EVEN_K: tl.constexpr,       # K % BLOCK_K == 0: every trip whole, no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # a multiple of 32 (any blocksize)
    SPLIT_K: tl.constexpr,
):
    # The decode GEMV without tensor cores, for K % BLOCKSIZE == 0: one program
    # of one warp per BLOCK_N rows of W over its split of K, every row sum
    # finished in registers. Load layout ("lines", L1_LAYOUT): a lane reads a
    # 16-byte piece (4 words, 32 columns) of a row, consecutive lanes the
    # consecutive pieces of the same row, so at BLOCK_K = 256 a 128-bit warp
    # load covers 4 rows x 128 contiguous bytes, 4 whole lines (one lane per
    # row touched 32 lines per load: the H200 found that layout bound by
    # L1/TEX wavefronts). A piece lies in one block (blocksize >= 32): its 32
    # products are summed in the lane and scaled by its block's scale (loaded
    # per row and piece, in the same lanes), and each lane keeps its pieces'
    # sums until the loop ends; then a row's lanes are added once. Per weight:
    # a shift and mask, a shuffle into the register codebook and one FFMA (a
    # piece's 32 products one chain; bf16 x widened by its bits, once per
    # lane for all its rows). K a multiple of BLOCK_K (EVEN_K: every profiled
    # layer) runs unmasked: rows past N and x's rows past M are clamped to
    # real ones (their sums are not stored) and the prefetch past the split's
    # end re-reads its last trip; otherwise each piece is masked.
    # Grid (N tiles, SPLIT_K): a narrow layer splits K so that every SM gets
    # programs; the last program of a row tile to finish adds the others'
    # partial sums (still one launch, no zero fill, no atomics on y).
    # Software pipelined: the next trip's words and stored scales are loaded
    # before this trip's decode (PREFETCH_TRIPS).
    # Lanes and registers: LPR = BLOCK_K / 32 lanes per row, RPL = 32 / LPR
    # rows across the warp, RPLANE = BLOCK_N / RPL rows per lane (BLOCK_N a
    # multiple of RPL). The loads are [4, 32, RPLANE] (word of the piece,
    # lane, the lane's row) and [32, RPLANE]: Triton's coalescing gives each
    # lane its piece's 4 words as one 128-bit load and spreads the lane axis
    # over the 32 lanes (the axes after the contiguous one tie on contiguity
    # and Triton takes them in axis order; sm90_sass checks the loads it
    # emits). Everything after them is permuted to [..., RPLANE, (4,) 32], the
    # lane axis last as in Triton's default layout (the same lanes, registers
    # reordered only): the codebook gather runs along the lanes (one shuffle
    # per weight), and every product, scale and sum until the loop ends stays
    # in its lane.
    LPR: tl.constexpr = BLOCK_K // 32
    RPL: tl.constexpr = 32 // LPR
    RPLANE: tl.constexpr = BLOCK_N // RPL
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    lane = tl.arange(0, 32)
    rq = tl.arange(0, RPLANE)
    rn = pid_n * BLOCK_N + rq[None, :] * RPL + (lane // LPR)[:, None]   # [32, RPLANE]
    col = 32 * (lane % LPR)                                              # [32]: the piece
    row_ok = rn < N
    rm = tl.arange(0, ROWS)
    rw = tl.arange(0, 4)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((ROWS, RPLANE, 32), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if EVEN_K:
        # Every trip whole: no masks. Rows past N read row N - 1 and rows of
        # x past M row M - 1 (finite values whose sums are never stored), and
        # the prefetch past the split's end re-reads its last trip.
        rn_ld = tl.minimum(rn, N - 1)
        rm_ld = tl.minimum(rm, M - 1)
    else:
        rn_ld = rn
        rm_ld = rm
    # Trips start on multiples of BLOCK_K, so the block of a piece at column
    # k + col is k // BLOCKSIZE + col // BLOCKSIZE (powers of two: a block
    # wider than a trip holds all of it).
    w_ptrs = words_ptr + rw[:, None, None] + (rn_ld * stride_wn + col[:, None] // 8)[None]
    s_base = rn_ld * (K // BLOCKSIZE) + (col // BLOCKSIZE)[:, None]
    w0, raw = _fma_trip_loads(w_ptrs, absmax_ptr, s_base, k_start, k_end, col, row_ok, BLOCK_K,
                              BLOCKSIZE, DOUBLE_QUANT, EVEN_K)
    # x of each lane's piece, [ROWS, 32, 4, 8] (row of x, lane, word, column;
    # the lane axis ahead of the word axis for the same coalescing reason).
    x_off = (rm_ld[:, None, None, None] * stride_xm
             + (col[None, :, None, None] + 8 * rw[None, None, :, None]
                + tl.arange(0, 8)[None, None, None, :]) * stride_xk)
    x_ok = rm[:, None, None, None] < M
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    for k0 in range(k_start, k_end, BLOCK_K):
        n0, next_raw = _fma_trip_loads(w_ptrs, absmax_ptr, s_base, k0 + BLOCK_K, k_end, col,
                                       row_ok, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, EVEN_K)
        if EVEN_K:
            x = tl.load(x_ptr + k0 * stride_xk + x_off)
        else:
            x = tl.load(x_ptr + k0 * stride_xk + x_off,
                        mask=x_ok & (k0 + col < k_end)[None, :, None, None], other=0.0)
        part = nf4_x_pieces(table, tl.permute(w0.to(tl.uint32, bitcast=True), (2, 0, 1)), x)
        s_idx = s_base + k0 // BLOCKSIZE
        if EVEN_K:
            scale = _fma_scale(raw, absmax2_ptr, code2_ptr, offset, s_idx, DOUBLE_QUANT,
                               BLOCKSIZE2)
        else:
            scale = nf4_scale_of(raw, absmax2_ptr, code2_ptr, offset_ptr, s_idx,
                                 row_ok & (k0 + col < k_end)[:, None], DOUBLE_QUANT, BLOCKSIZE2)
        acc += tl.trans(scale)[None] * part
        w0 = n0
        raw = next_raw
    # Row sums: a row's LPR lanes (adjacent) added once, after the loop; the
    # row of (r, lane) is r * RPL + lane // LPR.
    acc = tl.reshape(tl.sum(tl.reshape(acc, (ROWS, RPLANE, RPL, LPR)), axis=3), (ROWS, BLOCK_N))
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    if HAS_LORA:
        if pid_k == 0:  # one split adds the update
            acc += scaling * _lora_rows(h_ptr, lora_b_ptr, rm, rn, M, N, R, stride_hm, stride_bn,
                                        stride_br)
    out = rm[:, None] * N + rn[None, :]
    out_ok = (rm[:, None] < M) & row_ok[None, :]
    split_epilogue(acc, rn[None, :] + 0 * rm[:, None], out, out_ok, bias_ptr, y_ptr, partial_ptr,
                   count_ptr, pid_n, pid_k, M, N, stride_b, HAS_BIAS, SPLIT_K)


@triton.jit
def _nf4_gemv_dot_kernel(
    # pointers
    x_ptr,          # [M, K] fp32/fp16/bf16 (any strides), M <= 16
    words_ptr,      # int32 [N * K // 8]: the packed bytes read 4 at a time
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    bias_ptr,       # [N] (any stride; read only when HAS_BIAS)
    y_ptr,          # [M, N] x's dtype, out (contiguous)
    partial_ptr,    # fp32 [SPLIT_K, M, N] scratch (SPLIT_K > 1 only)
    count_ptr,      # int32 [cdiv(N, BLOCK_N)], zero on entry and on exit (SPLIT_K > 1 only)
    h_ptr,          # [M, R] x's dtype: x @ lora_A.T (read only when HAS_LORA)
    lora_b_ptr,     # [N, R] x's dtype: lora_B (any strides; read only when HAS_LORA)
    scaling,        # fp32: the LoRA scale
    # sizes
    M, N, K, R,     # R: the LoRA rank
    # strides
    stride_wn,      # K // 8: words per row of W
    stride_xm, stride_xk, stride_b,
    stride_hm, stride_bn, stride_br,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,     # add scaling * h @ lora_B.T (the LoRA update, folded)
    DOT_FP32: tl.constexpr,     # cast dot operands to fp32 (interpreter only, see backend)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision (launch.dot_precision)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # 128 or 256 (any blocksize)
    SPLIT_K: tl.constexpr,
):
    # The decode GEMV on tensor cores for 2..16 rows, K % BLOCKSIZE == 0:
    # y^T = W @ x^T, so the W tile decoded in registers is the dot's A operand
    # (wgmma reads it from registers; x^T, padded to 16 columns, is B in shared
    # memory). Same grid and split epilogue as the FMA GEMV.
    # Layout ("fragment", L1_LAYOUT): the order of K inside a trip is free (x^T
    # takes the same order), so the words are read in the A operand's own
    # register layout and the decoded tile needs no conversion between lanes.
    # The wgmma A fragment (m64 per 4 warps, k16 steps): lane l holds rows
    # l/4 and l/4 + 8 and the k with bits 1,2 = l % 4; warps hold row bits
    # 4,5; registers row bit 3, rows >= 64, and k bits 0 and >= 3. A lane's
    # k (k1,k2 fixed) are one contiguous physical run per row: physical column
    # pk = 32 * (H * q + h) + 8 * a + p (q = lane % 4, h < H = BLOCK_K / 128
    # the lane's run, a its word, p the element in the word) is logical
    # k = (h, a, p2, p1, q, p0) as bits from the top (k7 = h when H = 2).
    # So a lane reads 16 bytes (4 words, 32 columns: one 128-bit load) per
    # run and row; the 4 lanes of a quad and their H runs cover the row's
    # BLOCK_K / 2 bytes, one line at BLOCK_K = 256, and a warp load 8 rows
    # (8 lines per 512 bytes; a row's lines are its own). Rows keep their
    # order: logical row = physical row = 64 * r + 16 * warp + 8 * r3 + l / 4.
    # The codebook gather runs along the lanes (one shuffle per weight); each
    # run lies in one block (K % 32 == 0), whose scale multiplies its 32
    # codes before the dot (the 4 lanes of a k16 step read different runs, so
    # the product cannot be scaled after it).
    # The next trip's words and stored scales are loaded before this trip's
    # decode (PREFETCH_TRIPS; num_stages 1: no asynchronous copies).
    H: tl.constexpr = BLOCK_K // 128
    G: tl.constexpr = BLOCK_N // 16
    # Scales per lane and row: one when a lane's H runs lie in one block.
    SH: tl.constexpr = H if BLOCKSIZE < 32 * H else 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    lane = tl.arange(0, 32)
    q = lane % 4
    # [32, G, 2, 1]: each row's lane, 16-row group (the warps, then
    # registers), row bit 3 and (size 1) run, as loaded.
    rows = (pid_n * BLOCK_N + (lane // 4)[:, None, None, None]
            + 16 * tl.arange(0, G)[None, :, None, None]
            + 8 * tl.arange(0, 2)[None, None, :, None])
    row_ok = rows < N
    # The runs' first columns: [32, 1, 1, H] and (scales) [32, 1, 1, SH].
    col = 32 * (H * q[:, None, None, None] + tl.arange(0, H)[None, None, None, :])
    s_col = 32 * (H * q[:, None, None, None] + tl.arange(0, SH)[None, None, None, :])
    rw = tl.arange(0, 4)
    w_ptrs = words_ptr + rw[:, None, None, None, None] + (rows * stride_wn + col // 8)[None]
    s_rows = rows * (K // BLOCKSIZE)
    table = nf4_code_table(code_ptr)
    rm = tl.arange(0, 16)
    x_col = (32 * (H * tl.arange(0, 4)[:, None, None] + tl.arange(0, H)[None, :, None])
             + tl.arange(0, 32)[None, None, :])                     # [4, H, 32]
    x_off = rm[:, None, None, None] * stride_xm + x_col[None] * stride_xk
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # K % 32 == 0: a run is all in or all out, so its mask is constant along
    # its 4 words and the loads stay 128-bit. Masked words read 0 (code -1.0):
    # their x is 0, or their row is not stored; masked scales read 0.
    w0 = tl.load(w_ptrs + k_start // 8, mask=(row_ok & (k_start + col < k_end))[None], other=0)
    raw = nf4_scale_raw(absmax_ptr, s_rows + (k_start + s_col) // BLOCKSIZE,
                        row_ok & (k_start + s_col < k_end), DOUBLE_QUANT)
    for k0 in range(k_start, k_end, BLOCK_K):
        k1 = k0 + BLOCK_K
        n0 = tl.load(w_ptrs + k1 // 8, mask=(row_ok & (k1 + col < k_end))[None], other=0)
        next_raw = nf4_scale_raw(absmax_ptr, s_rows + (k1 + s_col) // BLOCKSIZE,
                                 row_ok & (k1 + s_col < k_end), DOUBLE_QUANT)
        scale = nf4_scale_of(raw, absmax2_ptr, code2_ptr, offset_ptr,
                             s_rows + (k0 + s_col) // BLOCKSIZE, row_ok & (k0 + s_col < k_end),
                             DOUBLE_QUANT, BLOCKSIZE2)
        # x in column order: [16, 4, H, 32] (row of x, lane % 4, run, column).
        xp = tl.load(x_ptr + k0 * stride_xk + x_off,
                     mask=(rm < M)[:, None, None, None] & (k0 + x_col < k_end)[None], other=0.0)
        wu = w0.to(tl.uint32, bitcast=True)
        if H == 2:  # one dot per run, so that one run's tile is live at a time
            wa, wb = tl.split(wu)
            xa, xb = tl.split(tl.permute(xp, (0, 1, 3, 2)))
            if SH == 2:
                sa, sb = tl.split(scale)
            else:
                sa = tl.reshape(scale, (32, G, 2))
                sb = sa
            acc = _fragment_dot(table, wa, sa, xa, acc, DOT_FP32, DOT_PRECISION)
            acc = _fragment_dot(table, wb, sb, xb, acc, DOT_FP32, DOT_PRECISION)
        else:
            acc = _fragment_dot(table, tl.reshape(wu, (4, 32, G, 2)), tl.reshape(scale, (32, G, 2)),
                                tl.reshape(xp, (16, 4, 32)), acc, DOT_FP32, DOT_PRECISION)
        w0 = n0
        raw = next_raw
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    if HAS_LORA:
        if pid_k == 0:  # one split adds the update
            acc += scaling * _lora_cols(h_ptr, lora_b_ptr, rm, rn, M, N, R, stride_hm, stride_bn,
                                        stride_br, DOT_FP32)
    out = rm[None, :] * N + rn[:, None]
    out_ok = (rm[None, :] < M) & row_ok[:, None]
    split_epilogue(acc, rn[:, None] + 0 * rm[None, :], out, out_ok, bias_ptr, y_ptr, partial_ptr,
                   count_ptr, pid_n, pid_k, M, N, stride_b, HAS_BIAS, SPLIT_K)


@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr,          # [M, K] fp32/fp16/bf16 (any strides), M <= BLOCK_M
    packed_ptr,     # uint8 [(N * K + 1) // 2]
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    bias_ptr,       # [N] (read only when HAS_BIAS)
    y_ptr,          # fp32 [M, N], zeroed; partial sums are atomically added
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # Grid (N tiles, SPLIT_K). With few rows the cost is reading W once; with
    # only N / BLOCK_N programs a 4096-wide layer would leave most SMs idle, so
    # each program takes 1 / SPLIT_K of K.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = nf4_x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                offset_ptr, rm, rn, k_start, k_end, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE,
                   BLOCKSIZE2, DOUBLE_QUANT, DOT_FP32, DOT_PRECISION)
    if HAS_BIAS:
        # Only the first split adds the bias.
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    tl.atomic_add(y_ptr + rm[:, None] * N + rn[None, :], acc,
                  mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemv_words(x: torch.Tensor, words: torch.Tensor, tensors: tuple, qw: NF4Weight,
               bias: torch.Tensor | None, meta: dict, lora: tuple | None = None) -> torch.Tensor:
    """The word GEMVs (``K % blocksize == 0``): the FMA kernel for M <=
    GEMV_FMA_MAX_M, the tensor-core one up to GEMV_MAX_M; one launch.
    ``lora`` = (h [M, r], lora_B [N, r], scaling), both in x's dtype with h's
    rows contiguous: the epilogue adds ``scaling * h @ lora_B.T`` in fp32."""
    M, K = x.shape
    N = qw.shape[0]
    name = "fma" if M <= GEMV_FMA_MAX_M else "dot"
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    # Meta tensors (tensor accounting, ops/meta.py) take the GPU's config, so that
    # what they allocate (split-K partials) is what the GPU run allocates.
    cfg = gemv_config(name, N, K, qw.blocksize, x.dtype == torch.float32,
                      interpret=INTERPRET and x.device.type != "meta")
    candidates = gemv_configs(name)
    tuned = candidates if autotune_enabled() and not INTERPRET else (cfg,)
    splits = max(c.kwargs["SPLIT_K"] for c in tuned)
    partial = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
    tiles = max(-(-N // c.kwargs["BLOCK_N"]) for c in tuned)
    count = split_counter(x.device, tiles) if splits > 1 else y
    h, lora_b, scaling = lora if lora is not None else (y, y, 0.0)
    args = (x, words, *tensors[1:], bias if bias is not None else y, y, partial, count,
            h, lora_b, float(scaling),
            M, N, K, h.shape[1] if lora is not None else 0, K // 8, x.stride(0), x.stride(1),
            bias.stride(0) if bias is not None else 0,
            h.stride(0), lora_b.stride(0), lora_b.stride(1))
    const = dict(BLOCKSIZE=meta["BLOCKSIZE"], BLOCKSIZE2=meta["BLOCKSIZE2"],
                 DOUBLE_QUANT=meta["DOUBLE_QUANT"], HAS_BIAS=bias is not None,
                 HAS_LORA=lora is not None)
    if name == "fma":
        const["ROWS"] = 1 << (M - 1).bit_length()  # next power of two
        # Whole trips for every candidate (the autotuner keys on K): no masks.
        const["EVEN_K"] = all(K % c.kwargs["BLOCK_K"] == 0 for c in tuned)
        kernel = _nf4_gemv_fma_kernel
    else:
        const.update(DOT_FP32=dot_in_fp32(x.device), DOT_PRECISION=dot_precision(x.dtype))
        kernel = _nf4_gemv_dot_kernel
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"])  # noqa: E731
    launch(kernel, grid, args, const, cfg, candidates, prune_gemv)
    return y


def gemv_general(x: torch.Tensor, tensors: tuple, qw: NF4Weight, bias: torch.Tensor | None,
                 meta: dict) -> torch.Tensor:
    """The per-element-decode GEMV (``K % blocksize != 0``): fp32 atomics into
    a zeroed output, cast to x's dtype after."""
    M, K = x.shape
    N = qw.shape[0]
    y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    args = (x, *tensors, bias if bias is not None else qw.code, y, M, N, K, x.stride(0), x.stride(1))
    const = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.device),
                 DOT_PRECISION=dot_precision(x.dtype), BLOCKSIZE=meta["BLOCKSIZE"],
                 BLOCKSIZE2=meta["BLOCKSIZE2"], DOUBLE_QUANT=meta["DOUBLE_QUANT"])
    cfg = general_config("gemv", N, K, interpret=INTERPRET and x.device.type != "meta")
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"])  # noqa: E731
    launch(_nf4_gemv_kernel, grid, args, const, cfg, general_configs("gemv"),
           reset_to_zero=["y_ptr"])
    return y if x.dtype == torch.float32 else y.to(x.dtype)
