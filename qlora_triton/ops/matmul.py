"""Fused NF4 matmul kernels: ``y = x @ W.T (+ bias)`` and ``grad_x = grad_y @ W``
through a packed NF4 weight, decoded tile by tile in registers (no dense copy of
W is ever written to memory).

When ``K % blocksize == 0`` (every row starts on a 32-bit word of packed bytes)
the kernels read int32 words and decode them with the register codebook of
:mod:`.dequantize` (a shuffle per weight, the scale once per row segment):

* ``_nf4_gemv_fma_kernel`` (M = 1) and ``_nf4_gemv_dot_kernel`` (M <= 16):
  decode; memory-bound, K split across programs.
* ``_nf4_gemm_words_kernel`` / ``_nf4_grad_input_words_kernel``: training and
  prefill, computed transposed so that the decoded W tile is the wgmma's
  register operand; shipped sm_90 configs in :mod:`.tuned_sm90`.

Otherwise (blocks crossing rows) the per-element decode (:func:`_nf4_w_tile`)
runs in ``_nf4_gemm_kernel``, ``_nf4_gemv_kernel`` (split-K, fp32 atomics) and
``_nf4_grad_input_kernel`` (the same W tile, the loop over N instead of K).

Element ``(n, k)`` of W is flat index ``n * K + k``: byte ``idx // 2`` (high nibble
first), scale block ``idx // blocksize``. When ``K % blocksize == 0`` a row
segment of ``BLOCK_K <= blocksize`` columns lies in one block, so the fast path
loads one scale per row and contiguous bytes; otherwise (blocks crossing rows)
the general path indexes every element.

Which of them runs (or the "dequant" strategy of :mod:`.scratch` instead) is
decided by :func:`qlora_triton.strategy.select_strategy`.
"""

from __future__ import annotations

import collections
import functools

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET, dot_in_fp32
from ..strategy import GEMV_MAX_M, select_strategy, strategies
from ..weight import NF4Weight
from .cast import cast_rtne
from .dequantize import nf4_code, nf4_code_table, nf4_decode_words, nf4_scale, scale_args
from .scratch import dequant_grad_input, dequant_matmul
from .tuned_sm90 import (autotune_enabled, gemm_config, gemm_configs, gemv_config, gemv_configs,
                         prune_gemm, prune_gemv)

# Largest M the FMA GEMV (no tl.dot) takes: every row of x costs it one FFMA
# per weight. Profiled (Triton 3.6, bf16): 4.9 thread-instructions per weight
# at M = 1, 7.5 at M = 2, 11.5 at M = 4; the register-decode tensor-core GEMV
# costs 5.1 at any M <= 16, so it takes M >= 2.
GEMV_FMA_MAX_M = 1

# How often each kernel ran, by name ("gemm", "gemv", "grad_input",
# "dequantize"): tests read it to see which kernels a strategy launched
# (qlora_triton.strategy.strategies says which strategy ran).
launches: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------- decode
@triton.jit
def _nf4_w_tile_any(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                    rn, rk, N, K,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W[rn, rk] in fp32 for any K: every element finds its own byte and block."""
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    idx = rn[:, None] * K + rk[None, :]
    # Masked elements decode to code[7] * 0 = 0.0, so they add nothing to a dot.
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx // BLOCKSIZE, mask,
                      DOUBLE_QUANT, BLOCKSIZE2)
    return nf4_code(packed_ptr, code_ptr, idx, mask) * scale


@triton.jit
def _nf4_w_tile_aligned(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        rn, k0, N, K,
                        BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K] in fp32 when K % BLOCKSIZE == 0 and BLOCK_K <= BLOCKSIZE
    (so K % BLOCK_K == 0 and k0 is a multiple of BLOCK_K): each row's segment is
    BLOCK_K // 2 contiguous bytes under one scale."""
    row_ok = rn < N
    rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=row_ok[:, None],
                   other=0x77).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 0xF))
    # [BLOCK_N, BLOCK_K // 2, 2] -> [BLOCK_N, BLOCK_K]: element 2j is the high nibble.
    w = tl.reshape(tl.join(hi, lo), (hi.shape[0], BLOCK_K))
    # One scale per row: a gather of BLOCK_N values instead of BLOCK_N * BLOCK_K
    # (three of them with double quantization).
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, BLOCKSIZE2)
    return w * scale[:, None]


@triton.jit
def _nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                rn, k0, N, K,
                BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr):
    """The fp32 tile W[rn, k0:k0+BLOCK_K] (``rn``: [BLOCK_N] row indices);
    out-of-range elements are 0.0. ``ALIGNED``: K % BLOCKSIZE == 0."""
    if ALIGNED:
        if BLOCK_K <= BLOCKSIZE:
            w = _nf4_w_tile_aligned(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                    offset_ptr, rn, k0, N, K, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                    DOUBLE_QUANT)
        else:
            w = _nf4_w_tile_any(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                offset_ptr, rn, k0 + tl.arange(0, BLOCK_K), N, K, BLOCKSIZE,
                                BLOCKSIZE2, DOUBLE_QUANT)
    else:
        w = _nf4_w_tile_any(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                            offset_ptr, rn, k0 + tl.arange(0, BLOCK_K), N, K, BLOCKSIZE,
                            BLOCKSIZE2, DOUBLE_QUANT)
    return w


# --------------------------------------------------------------------------- autotuning
def _config(bm, bn, bk, warps, stages, **extra):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra),
                         num_warps=warps, num_stages=stages)


def _tile_configs(interpret: bool = INTERPRET) -> list:
    """GEMM and grad-input tiles. The interpreter gets exactly one (timing every
    config there would take minutes); it runs the same code with larger tiles."""
    if interpret:
        return [_config(64, 64, 64, 4, 1, GROUP_M=4)]
    # No BLOCK_K = 128 tile: compiled for sm_90 (scripts/sm90_compile.py,
    # benchmarks/results/sm90-compile-*), 128x128x128 w8 s3 and 64x128x128 w4 s3
    # need 442-655 KB of shared memory for blocksize-64 weights (limit 227 KB:
    # they can never launch) and spill up to 3.5 KB at 255 registers. No
    # 128x256x64 tile either: it runs at 255 registers (Triton 3.9 spills 8-24 B)
    # and _fits never kept it.
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4), (256, 128, 64, 8, 3), (64, 256, 64, 8, 3), (32, 128, 64, 4, 4),
    ]
    return [_config(*t, GROUP_M=8) for t in tiles]


def general_config(op: str, interpret: bool = INTERPRET) -> triton.Config:
    """The per-element-decode GEMM's (``op`` "forward") or grad-input's config
    for K % blocksize != 0 when the autotuner is off: the widest tile measured
    to launch on that path without spilling (_GENERAL_PATH_TILES)."""
    if interpret:
        return _tile_configs(interpret=True)[0]
    if op == "forward":
        return _config(128, 128, 32, 8, 4, GROUP_M=8)
    return _config(128, 64, 64, 4, 3, GROUP_M=8)


def _gemv_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [_config(GEMV_MAX_M, 128, 64, 4, 1, SPLIT_K=2)]
    out = []
    # No BLOCK_K = 128 tile: for sm_90, 16x128x128 and 16x64x128 need 430-475 KB
    # of shared memory (> 227 KB) and spill up to 4 KB (sm90_compile report).
    for bn, bk, warps in [(64, 64, 4), (128, 64, 4), (256, 64, 8), (32, 64, 2)]:
        for split in (1, 2, 4, 8, 16):
            out.append(_config(GEMV_MAX_M, bn, bk, warps, 3, SPLIT_K=split))
    return out


# Registers per thread left for the accumulator and the decoded W tile (of 255);
# an estimate: the GPU run has to confirm which configs spill.
_REGISTER_BUDGET = 160
_SMEM_BYTES = 200 * 1024  # H100/H200 allow ~227 KB per block; leave headroom.


def _fits(cfg: triton.Config, red_block: str) -> bool:
    """Whether ``cfg`` fits a Hopper SM (a conservative estimate): pipelined
    operand tiles in shared memory, accumulator + decoded fp32 W tile in
    registers. ``red_block`` names the reduction tile (BLOCK_K for the forward,
    BLOCK_N for grad-input)."""
    kw = cfg.kwargs
    m, n, k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    smem = cfg.num_stages * (m * kw[red_block] * 2 + n * k * 2)
    regs = (m * (k if red_block == "BLOCK_N" else n) + n * k) // (32 * cfg.num_warps)
    return smem <= _SMEM_BYTES and regs <= _REGISTER_BUDGET


# Compiled for sm_90 with Triton 3.6 and 3.9 (scripts/sm90_compile.py; reports
# in benchmarks/results/sm90-compile-*): the tiles below are the ones whose
# general-path decode (K % blocksize != 0, or BLOCK_K > blocksize) needs at most
# 227 KB of shared memory and spills nothing, for fp32/fp16/bf16 x with and
# without double quantization. That path gathers every element's byte and
# scale, and the software pipeliner stages those gathers in shared memory: the
# other tiles need 237-557 KB (they cannot launch: OutOfResources) or spill
# 12 B-2.3 KB at 255 registers. Keys: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages);
# GEMV tiles without BLOCK_M (always 16) and SPLIT_K (same code).
_GENERAL_PATH_TILES = {
    # 128x128x32 w8 s4: 222 regs, 224 KB; 64x64x64 w4 s4: 207 regs, 224 KB.
    "forward": {(128, 128, 32, 8, 4), (64, 64, 64, 4, 4)},
    # 128x64x64 w4 s3: 253 regs, 208 KB; 64x64x64 w4 s4: 204 regs, 224 KB.
    "grad_input": {(128, 64, 64, 4, 3), (64, 64, 64, 4, 4)},
    # 16x64x64 w4: 164 regs, 120 KB; 16x32x64 w2: 200 regs, 64 KB.
    "gemv": {(64, 64, 4, 3), (32, 64, 2, 3)},
}
# The aligned grad-input path: tiles measured over 227 KB of shared memory
# (256x128x64: 325 KB and 64x256x64: 266 KB with fp32 grad_y) or spilling
# (32x128x64 w4: 255 regs, 112 B on 3.6).
_GRAD_INPUT_ALIGNED_BAD = {(256, 128, 64, 8, 3), (64, 256, 64, 8, 3), (32, 128, 64, 4, 4)}


def _tile_key(cfg: triton.Config, with_m: bool = True) -> tuple:
    kw = cfg.kwargs
    head = (kw["BLOCK_M"],) if with_m else ()
    return (*head, kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)


def _compiles_well(cfg: triton.Config, args: dict, kernel: str) -> bool:
    """Whether ``cfg`` launches without spilling on sm_90 for this weight's decode
    path (measured, see _GENERAL_PATH_TILES)."""
    general = not args["ALIGNED"] or cfg.kwargs["BLOCK_K"] > args["BLOCKSIZE"]
    key = _tile_key(cfg, with_m=kernel != "gemv")
    if general:
        return key in _GENERAL_PATH_TILES[kernel]
    return not (kernel == "grad_input" and key in _GRAD_INPUT_ALIGNED_BAD)


def _prune(configs, named_args, red_block, **kwargs):
    args = {**named_args, **kwargs}
    bucket, blocksize, aligned = args["m_bucket"], args["BLOCKSIZE"], args["ALIGNED"]
    keep = [c for c in configs if _fits(c, red_block)]
    # A hard limit first (the interpreter's single config is not in the measured
    # sets and falls through unchanged).
    kernel = "grad_input" if red_block == "BLOCK_N" else "forward"
    keep = [c for c in keep if _compiles_well(c, args, kernel)] or keep
    # Tiles taller than the (bucketed) M only multiply zeros.
    short = [c for c in keep if c.kwargs["BLOCK_M"] <= max(GEMV_MAX_M, bucket)]
    keep = short or keep
    # The aligned fast path (one scale per row, contiguous bytes) needs the K
    # tile inside one quantization block.
    if aligned:
        fast = [c for c in keep if c.kwargs["BLOCK_K"] <= blocksize]
        keep = fast or keep
    return keep or configs[:1]


def _prune_forward(configs, named_args, **kwargs):
    return _prune(configs, named_args, "BLOCK_K", **kwargs)


def _prune_grad_input(configs, named_args, **kwargs):
    return _prune(configs, named_args, "BLOCK_N", **kwargs)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    N, K = args["N"], args["K"]
    sms = _num_sms(args["y_ptr"].device)

    def useful(c):
        split, bn, bk = c.kwargs["SPLIT_K"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if split * bk > max(K, 64):
            return False  # some splits would get no K at all
        # Split K only while the grid is short of ~2 programs per SM: beyond
        # that a split adds atomics and no parallelism.
        return split == 1 or triton.cdiv(N, bn) * split // 2 < 2 * sms

    keep = [c for c in configs if useful(c)]
    keep = [c for c in keep if _compiles_well(c, args, "gemv")] or keep
    if args["ALIGNED"]:
        fast = [c for c in keep if c.kwargs["BLOCK_K"] <= args["BLOCKSIZE"]]
        keep = fast or keep
    return keep or configs[:1]


# Autotune keys: m_bucket (next power of two of M, capped) instead of M, so a new
# batch size reuses the tuned config of its bucket instead of recompiling/retuning.
_KEY = ["m_bucket", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"]


# --------------------------------------------------------------------------- kernels
@triton.jit
def _grouped_tile(pid, tiles_m, tiles_other, GROUP_M: tl.constexpr):
    """``(pid_m, pid_other)`` of program ``pid`` in grouped order: GROUP_M row
    tiles walk the other axis together, so each W tile decoded from L2 serves
    GROUP_M programs close in time."""
    per_group = GROUP_M * tiles_other
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

@triton.jit
def _x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
          offset_ptr, rm, rn, k_start, k_end, M, N, K,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
          ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr):
    """fp32 ``x[rm, k_start:k_end] @ W[rn, k_start:k_end].T``, decoding each W tile
    in registers; the forward GEMM and GEMV differ only in their K range."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        rn, k0, N, K, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, ALIGNED)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


@triton.autotune(configs=_tile_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _nf4_gemm_kernel(
    # pointers
    x_ptr,          # [M, K] fp32/fp16/bf16 (any strides)
    packed_ptr,     # uint8 [(N * K + 1) // 2], W [N, K] flattened, high nibble first
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    bias_ptr,       # [N] fp32/fp16/bf16 (read only when HAS_BIAS)
    y_ptr,          # [M, N] x's dtype, out (contiguous)
    # sizes
    M, N, K,
    m_bucket,       # autotune key only
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,      # K % BLOCKSIZE == 0
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,     # cast dot operands to fp32 (interpreter only, see backend)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                offset_ptr, rm, rn, 0, K, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                DOUBLE_QUANT, ALIGNED, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], cast_rtne(acc, y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_gemv_configs(), key=_KEY, reset_to_zero=["y_ptr"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
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
    m_bucket,       # autotune key only
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
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
    # Split boundaries on BLOCK_K multiples keep the aligned path's k0 aligned.
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = _x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                offset_ptr, rm, rn, k_start, k_end, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE,
                BLOCKSIZE2, DOUBLE_QUANT, ALIGNED, DOT_FP32)
    if HAS_BIAS:
        # Only the first split adds the bias.
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    tl.atomic_add(y_ptr + rm[:, None] * N + rn[None, :], acc,
                  mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _nf4_x_words(table, words, x):
    """``sum_k W[n, k] * x[m, k]`` over 32 columns, before the block scale:
    ``words`` [4, BLOCK_N] uint32 (see nf4_decode_words), ``x`` [ROWS, 4, 8]
    -> fp32 [ROWS, BLOCK_N]."""
    ROWS: tl.constexpr = x.shape[0]
    # x[:, w, i] for i = 0..7 as [ROWS, 4] tensors: tl.split halves the last
    # axis of i = 4a + 2b + c, so c (i % 2) comes off first.
    even, odd = tl.split(tl.reshape(x, (ROWS, 4, 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_decode_words(table, words)
    p = c0[None] * x0.to(tl.float32)[:, :, None]
    p += c1[None] * x1.to(tl.float32)[:, :, None]
    p += c2[None] * x2.to(tl.float32)[:, :, None]
    p += c3[None] * x3.to(tl.float32)[:, :, None]
    p += c4[None] * x4.to(tl.float32)[:, :, None]
    p += c5[None] * x5.to(tl.float32)[:, :, None]
    p += c6[None] * x6.to(tl.float32)[:, :, None]
    p += c7[None] * x7.to(tl.float32)[:, :, None]
    return tl.sum(p, axis=1)


@triton.jit
def _nf4_w_words_tile(table, words):
    """The codes of ``words`` [KW, BLOCK_N] as the W tile [BLOCK_N, 8 * KW] fp32
    (unscaled), built in registers for the dot's A operand."""
    c0, c1, c2, c3, c4, c5, c6, c7 = nf4_decode_words(table, words)
    # join stacks on a new last axis: [KW, BLOCK_N, a, b, c] with i = 4a + 2b + c.
    w = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    w = tl.permute(w, (1, 0, 2, 3, 4))
    return tl.reshape(w, (words.shape[1], 8 * words.shape[0]))


@triton.jit
def _gemv_epilogue(acc, rn, out, out_ok, bias_ptr, y_ptr, partial_ptr, count_ptr, pid_n, pid_k,
                   M, N, stride_b, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the GEMV tile ``acc`` (fp32; ``rn``, ``out``, ``out_ok``: its row of
    W, flat y offset and mask, all of acc's shape) as y (+ bias) in y's dtype.
    With SPLIT_K > 1 the program stores its partial sum instead, and the last
    program of the row tile to finish adds all of them in a fixed order."""
    if SPLIT_K > 1:
        tl.store(partial_ptr + pid_k * M * N + out, acc, mask=out_ok)
        tl.debug_barrier()  # every lane's partials stored before the count goes up
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                # .cg: read L2, where the other SMs' partials are, not a stale L1 line.
                acc += tl.load(partial_ptr + split * M * N + out, mask=out_ok, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn * stride_b, mask=out_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + out, cast_rtne(acc, y_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_b, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, cast_rtne(acc, y_ptr.dtype.element_ty), mask=out_ok)


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
    # sizes
    M, N, K,
    # strides
    stride_wn,      # K // 8: words per row of W
    stride_xm, stride_xk, stride_b,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,         # power of two >= M
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # 32 or 64, <= BLOCKSIZE
    SPLIT_K: tl.constexpr,
):
    # The decode GEMV without tensor cores, for K % BLOCKSIZE == 0: one program
    # of one warp per BLOCK_N rows of W over all of K, so every row sum is
    # finished in registers and stored once in x's dtype (one launch). Per
    # weight: a shift and mask, a shuffle into the register codebook and one
    # FFMA per row of x; the block scale multiplies a row's partial sum once
    # per block (sm90_sass profile: benchmarks/results/sm90-sass-*).
    # Grid (N tiles, SPLIT_K): a narrow layer splits K so that every SM gets
    # programs; the last program of a row tile to finish adds the others'
    # partial sums (still one launch, no zero fill, no atomics on y).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    rm = tl.arange(0, ROWS)
    rw = tl.arange(0, 4)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(BLOCK_K // 32):
            kc = k0 + 32 * c
            # K % 32 == 0: a chunk is all in or all out. The masks are built
            # constant along each vector (the "* 0") so the loads stay 128-bit.
            # Masked words read 0 (code -1.0): their x is 0, or their row is not stored.
            chunk_ok = (rw * 0 + kc) < K
            words = tl.load(words_ptr + rn[None, :] * stride_wn + kc // 8 + rw[:, None],
                            mask=row_ok[None, :] & chunk_ok[:, None], other=0)
            rk = kc + 8 * rw[None, :, None] + tl.arange(0, 8)[None, None, :]
            x = tl.load(x_ptr + rm[:, None, None] * stride_xm + rk * stride_xk,
                        mask=(rm[:, None, None] < M) & chunk_ok[None, :, None], other=0.0)
            part += _nf4_x_words(table, words.to(tl.uint32, bitcast=True), x)
        # BLOCK_K <= BLOCKSIZE: the K tile lies in one block of each row.
        scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                          rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, BLOCKSIZE2)
        acc += scale[None, :] * part
    out = rm[:, None] * N + rn[None, :]
    out_ok = (rm[:, None] < M) & row_ok[None, :]
    _gemv_epilogue(acc, rn[None, :] + 0 * rm[:, None], out, out_ok, bias_ptr, y_ptr, partial_ptr,
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
    # sizes
    M, N, K,
    # strides
    stride_wn,      # K // 8: words per row of W
    stride_xm, stride_xk, stride_b,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,     # cast dot operands to fp32 (interpreter only, see backend)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # 32 or 64, <= BLOCKSIZE
    SPLIT_K: tl.constexpr,
):
    # The decode GEMV on tensor cores for 2..16 rows, K % BLOCKSIZE == 0:
    # y^T = W @ x^T, so the W tile decoded in registers is the dot's A operand
    # (wgmma reads it from registers; x^T, padded to 16 columns, is B in shared
    # memory) and no decoded value goes through shared memory. Same decode,
    # grid and split epilogue as the FMA GEMV.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    rm = tl.arange(0, 16)
    rw = tl.arange(0, BLOCK_K // 8)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        # K % 32 == 0: each 4-word (32-column) run is all in or all out; the
        # mask is built constant along it so the loads stay 128-bit. Masked
        # words read 0 (code -1.0): their x is 0, or their row is not stored.
        word_ok = (k0 + 32 * (rw // 4)) < K
        words = tl.load(words_ptr + rn[None, :] * stride_wn + k0 // 8 + rw[:, None],
                        mask=row_ok[None, :] & word_ok[:, None], other=0)
        w = _nf4_w_words_tile(table, words.to(tl.uint32, bitcast=True))
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                     mask=(rm[None, :] < M) & (rk[:, None] < K), other=0.0)
        # BLOCK_K <= BLOCKSIZE: one block per row segment, so the scale
        # multiplies the [BLOCK_N, 16] product instead of the tile.
        if DOT_FP32:
            prod = tl.dot(w, xt.to(tl.float32))
        else:
            prod = tl.dot(w.to(x_ptr.dtype.element_ty), xt)
        scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                          rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, BLOCKSIZE2)
        acc += scale[:, None] * prod
    out = rm[None, :] * N + rn[:, None]
    out_ok = (rm[None, :] < M) & row_ok[:, None]
    _gemv_epilogue(acc, rn[:, None] + 0 * rm[None, :], out, out_ok, bias_ptr, y_ptr, partial_ptr,
                   count_ptr, pid_n, pid_k, M, N, stride_b, HAS_BIAS, SPLIT_K)


@triton.jit
def _nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rn, k0,
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
    w = _nf4_w_words_tile(table, words.to(tl.uint32, bitcast=True))
    scale = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, BLOCKSIZE2)
    return w * scale[:, None]


@triton.jit
def _nf4_gemm_words_kernel(
    # pointers
    x_ptr,          # [M, K] fp32/fp16/bf16 (any strides)
    words_ptr,      # int32 [N * K // 8]: the packed bytes read 4 at a time
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    bias_ptr,       # [N] (any stride; read only when HAS_BIAS)
    y_ptr,          # [M, N] x's dtype, out (contiguous)
    partial_ptr,    # fp32 [SPLIT_K, M, N] scratch (SPLIT_K > 1 only)
    count_ptr,      # int32 [output tiles], zero on entry and on exit (SPLIT_K > 1 only)
    # sizes
    M, N, K,
    # strides
    stride_wn,      # K // 8
    stride_xm, stride_xk, stride_b,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,     # cast dot operands to fp32 (interpreter only, see backend)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # <= BLOCKSIZE
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The fused GEMM for K % BLOCKSIZE == 0, computed transposed: y^T tile =
    # W tile @ x^T tile, so the W tile decoded (word decode, scale applied
    # once per row segment) in registers is the wgmma's A operand and never
    # goes through shared memory; x^T (BLOCK_M columns: up to 256, the widest
    # wgmma) is B in shared memory, and the MMA stays asynchronous across
    # iterations (sm90_sass --train). Grid (output tiles in grouped order,
    # SPLIT_K): short layers split K with the GEMVs' deterministic epilogue.
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        w = _nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                rn, k0, N, K, stride_wn, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                DOUBLE_QUANT)
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                     mask=rm[None, :] < M, other=0.0)
        if DOT_FP32:
            acc += tl.dot(w, xt.to(tl.float32))
        else:
            acc += tl.dot(w.to(x_ptr.dtype.element_ty), xt)
    out = rm[None, :] * N + rn[:, None]
    out_ok = (rm[None, :] < M) & (rn[:, None] < N)
    _gemv_epilogue(acc, rn[:, None] + 0 * rm[None, :], out, out_ok, bias_ptr, y_ptr, partial_ptr,
                   count_ptr, tile, pid_k, M, N, stride_b, HAS_BIAS, SPLIT_K)


@triton.jit
def _nf4_grad_input_words_kernel(
    # pointers
    gy_ptr,         # [M, N] fp32/fp16/bf16 (any strides), grad of y
    words_ptr,      # int32 [N * K // 8]
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    gx_ptr,         # [M, K] grad_y's dtype, out (contiguous)
    partial_ptr,    # fp32 [SPLIT_N, M, K] scratch (SPLIT_N > 1 only)
    count_ptr,      # int32 [output tiles], zero on entry and on exit (SPLIT_N > 1 only)
    # sizes
    M, N, K,
    # strides
    stride_wn,      # K // 8
    stride_gm, stride_gn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,      # <= BLOCKSIZE
    SPLIT_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grad_x^T tile = W^T tile @ grad_y^T tile, walking N: the decoded W tile,
    # transposed in registers, is the wgmma's A operand as in the forward.
    # Rows of W past N decode to finite values; their grad_y is 0.
    tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_k = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    n_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLIT_N) * BLOCK_N
    n_start = pid_s * n_per_split
    for n0 in range(n_start, tl.minimum(n_start + n_per_split, N), BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        w = _nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                rn, k0, N, K, stride_wn, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                DOUBLE_QUANT)
        gyt = tl.load(gy_ptr + rm[None, :] * stride_gm + rn[:, None] * stride_gn,
                      mask=(rm[None, :] < M) & (rn[:, None] < N), other=0.0)
        if DOT_FP32:
            acc += tl.dot(tl.trans(w), gyt.to(tl.float32))
        else:
            acc += tl.dot(tl.trans(w.to(gy_ptr.dtype.element_ty)), gyt)
    out = rm[None, :] * K + rk[:, None]
    out_ok = (rm[None, :] < M) & (rk[:, None] < K)
    _gemv_epilogue(acc, out, out, out_ok, gx_ptr, gx_ptr, partial_ptr, count_ptr, tile, pid_s,
                   M, K, 0, False, SPLIT_N)


# The same kernels behind the autotuner (QLORA_TRITON_AUTOTUNE=1): the shipped
# sm_90 table (ops/tuned_sm90.py) is a compile-time estimate until a GPU run
# calibrates it; this times the candidates instead.
_GEMV_WORDS = {"fma": _nf4_gemv_fma_kernel, "dot": _nf4_gemv_dot_kernel}
_GEMV_WORDS_AUTOTUNED = {
    name: triton.autotune(configs=gemv_configs(name), key=["N", "K", "M", "BLOCKSIZE"],
                          prune_configs_by={"early_config_prune": prune_gemv})(fn)
    for name, fn in _GEMV_WORDS.items()
}
_GEMM_WORDS = {"forward": _nf4_gemm_words_kernel, "grad_input": _nf4_grad_input_words_kernel}
_GEMM_WORDS_AUTOTUNED = {
    op: triton.autotune(configs=gemm_configs(op), key=["N", "K", "M", "BLOCKSIZE"],
                        prune_configs_by={"early_config_prune": prune_gemm})(fn)
    for op, fn in _GEMM_WORDS.items()
}


@triton.autotune(configs=_tile_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_grad_input})
@triton.jit
def _nf4_grad_input_kernel(
    # pointers
    gy_ptr,         # [M, N] fp32/fp16/bf16 (any strides), grad of y
    packed_ptr,     # uint8 [(N * K + 1) // 2]
    code_ptr,       # fp32 [16]
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # scales, see nf4_scale
    gx_ptr,         # [M, K] grad_y's dtype, out (contiguous)
    # sizes
    M, N, K,
    m_bucket,       # autotune key only
    # strides
    stride_gm, stride_gn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grad_x[M, K] = grad_y[M, N] @ W[N, K]: programs tile (M, K) and walk N.
    # The decoded tile is W[n0:n0+BLOCK_N, k0:k0+BLOCK_K] exactly as in the
    # forward, used untransposed; only the reduction axis differs.
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        gy = tl.load(gy_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        rn, k0, N, K, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, ALIGNED)
        if DOT_FP32:
            acc += tl.dot(gy.to(tl.float32), w)
        else:
            acc += tl.dot(gy, w.to(gy.dtype))
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], cast_rtne(acc, gx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# --------------------------------------------------------------------------- launchers
def _m_bucket(M: int) -> int:
    return min(triton.next_power_of_2(max(M, 1)), 4096)


def _weight_meta(qw: NF4Weight) -> dict:
    N, K = qw.shape
    if qw.numel >= 2**31:
        # Flat element indices are int32 in the kernels.
        raise ValueError(f"qw: weights with 2**31 or more elements are not supported, got {tuple(qw.shape)}")
    return dict(BLOCKSIZE=qw.blocksize, BLOCKSIZE2=qw.blocksize2, DOUBLE_QUANT=qw.double_quant,
                ALIGNED=K % qw.blocksize == 0)


INT32_LIMIT = 2**31  # element offsets in the kernels are int32


def _int32_row_chunks(a: torch.Tensor, out_cols: int) -> int | None:
    """Rows per launch so that every element offset of ``a`` [M, cols] and of the
    [M, out_cols] output fits the kernels' int32 arithmetic; ``None`` when one
    launch fits (the usual case). Beyond that (e.g. M >= 195k tokens against
    N = 11008) the launchers split the rows rather than wrap around."""
    M, cols = a.shape
    reach = (M - 1) * a.stride(0) + (cols - 1) * a.stride(1) + 1
    if max(reach, M * out_cols) < INT32_LIMIT:
        return None
    return max(1, (INT32_LIMIT - 1) // max(cols, out_cols))


def _weight_tensors(qw: NF4Weight) -> tuple:
    """(packed, code, absmax, absmax2, code2, offset) as the kernels read them:
    flat and contiguous (a strided or expanded field is copied once here)."""
    return tuple(t.contiguous() for t in (qw.packed, qw.code, *scale_args(qw)))


def _packed_words(qw: NF4Weight) -> torch.Tensor | None:
    """``qw.packed`` as int32 words for the FMA GEMV, or ``None`` when that
    kernel does not apply: it needs K % blocksize == 0 (so K % 32 == 0 and every
    row starts on a word) and a 4-byte-aligned packed tensor."""
    if qw.shape[1] % qw.blocksize:
        return None
    packed = qw.packed.contiguous()
    if packed.storage_offset() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


def _gemv_operands(qw: NF4Weight) -> tuple:
    """``(words, weight tensors)`` of the word GEMVs (:func:`_packed_words`,
    :func:`_weight_tensors`), made once per weight and kept on it: at M = 1 the
    host time of a call is the cost. Rebuilt when a field of ``qw`` is replaced;
    copies made here (strided fields, a misaligned ``packed``) do not follow
    later in-place edits of the originals."""
    fields = (qw.packed, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset)
    kept = qw.__dict__.get("_gemv_operands")
    if kept is not None and all(a is b for a, b in zip(kept[0], fields)):
        return kept[1]
    operands = (_packed_words(qw), _weight_tensors(qw))
    qw.__dict__["_gemv_operands"] = (fields, operands)
    return operands


# Per (device, stream): the split-K row-tile counters of the FMA GEMV. Zeroed
# once when made; every launch leaves them at zero again.
_split_counters: dict = {}


def _split_counter(device: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    count = _split_counters.get(key)
    if count is None or count.numel() < tiles:
        count = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _split_counters[key] = count
    return count


def _gemv_words(x: torch.Tensor, words: torch.Tensor, tensors: tuple, qw: NF4Weight,
                bias: torch.Tensor | None, meta: dict) -> torch.Tensor:
    """The aligned-path GEMVs (``_nf4_gemv_fma_kernel`` for one row, the
    tensor-core ``_nf4_gemv_dot_kernel`` up to GEMV_MAX_M): one launch."""
    M, K = x.shape
    N = qw.shape[0]
    name = "fma" if M <= GEMV_FMA_MAX_M else "dot"
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    tuned = autotune_enabled() and not INTERPRET
    # Meta tensors (tensor accounting, ops/meta.py) take the GPU's config, so that
    # what they allocate (split-K partials) is what the GPU run allocates.
    configs = (gemv_configs(name) if tuned
               else [gemv_config(name, N, K, qw.blocksize, x.dtype == torch.float32,
                                 interpret=INTERPRET and x.device.type != "meta")])
    splits = max(c.kwargs["SPLIT_K"] for c in configs)
    partial = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else y
    tiles = max(-(-N // c.kwargs["BLOCK_N"]) for c in configs)
    count = _split_counter(x.device, tiles) if splits > 1 else y
    args = (x, words, *tensors[1:], bias if bias is not None else y, y, partial, count,
            M, N, K, K // 8, x.stride(0), x.stride(1), bias.stride(0) if bias is not None else 0)
    const = dict(BLOCKSIZE=meta["BLOCKSIZE"], BLOCKSIZE2=meta["BLOCKSIZE2"],
                 DOUBLE_QUANT=meta["DOUBLE_QUANT"], HAS_BIAS=bias is not None)
    if name == "fma":
        const["ROWS"] = 1 << (M - 1).bit_length()  # next power of two
    else:
        const["DOT_FP32"] = dot_in_fp32(x.device)
    if tuned:
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"])  # noqa: E731
        _GEMV_WORDS_AUTOTUNED[name][grid](*args, **const)
    else:
        (cfg,) = configs
        grid = (-(-N // cfg.kwargs["BLOCK_N"]), cfg.kwargs["SPLIT_K"])
        _GEMV_WORDS[name][grid](*args, **const, **cfg.kwargs, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
    return y


def _gemm_words(op: str, a: torch.Tensor, words: torch.Tensor, tensors: tuple, qw: NF4Weight,
                bias: torch.Tensor | None, meta: dict) -> torch.Tensor:
    """The word-decoding fused GEMM (``op`` "forward": ``a`` = x [M, K]) or
    grad-input ("grad_input": ``a`` = grad_y [M, N]); one launch, shipped
    sm_90 config unless QLORA_TRITON_AUTOTUNE=1."""
    N, K = qw.shape
    M = a.shape[0]
    out_cols = N if op == "forward" else K
    split_key = "SPLIT_K" if op == "forward" else "SPLIT_N"
    out_block = "BLOCK_N" if op == "forward" else "BLOCK_K"
    out = torch.empty((M, out_cols), dtype=a.dtype, device=a.device)
    tuned = autotune_enabled() and not INTERPRET
    configs = (gemm_configs(op) if tuned
               else [gemm_config(op, M, N, K, qw.blocksize, a.dtype == torch.float32,
                                 interpret=INTERPRET and a.device.type != "meta")])
    splits = max(c.kwargs[split_key] for c in configs)
    partial = (torch.empty((splits, M, out_cols), dtype=torch.float32, device=a.device)
               if splits > 1 else out)
    tiles = max(-(-M // c.kwargs["BLOCK_M"]) * -(-out_cols // c.kwargs[out_block]) for c in configs)
    count = _split_counter(a.device, tiles) if splits > 1 else out
    const = dict(BLOCKSIZE=meta["BLOCKSIZE"], BLOCKSIZE2=meta["BLOCKSIZE2"],
                 DOUBLE_QUANT=meta["DOUBLE_QUANT"], DOT_FP32=dot_in_fp32(a.device))
    if op == "forward":
        args = (a, words, *tensors[1:], bias if bias is not None else out, out, partial, count,
                M, N, K, K // 8, a.stride(0), a.stride(1),
                bias.stride(0) if bias is not None else 0)
        const["HAS_BIAS"] = bias is not None
    else:
        args = (a, words, *tensors[1:], out, partial, count, M, N, K, K // 8, a.stride(0),
                a.stride(1))
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(out_cols, META[out_block]),  # noqa: E731
                         META[split_key])
    if tuned:
        _GEMM_WORDS_AUTOTUNED[op][grid](*args, **const)
    else:
        (cfg,) = configs
        _GEMM_WORDS[op][grid(cfg.kwargs)](*args, **const, **cfg.kwargs, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages)
    return out


def _general_kernel(kernel, op: str):
    """The autotuned per-element-decode ``kernel`` under QLORA_TRITON_AUTOTUNE=1,
    else its JIT function with the shipped config bound."""
    if autotune_enabled() and not INTERPRET:
        return kernel, {}
    cfg = general_config(op)
    return kernel.fn, dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x`` [M, K] (any strides) and ``qw`` of shape
    [N, K]; returns a contiguous [M, N] tensor of ``x.dtype``. Inputs are assumed
    checked (see :mod:`qlora_triton.matmul`)."""
    M, K = x.shape
    N = qw.shape[0]
    rows = _int32_row_chunks(x, N)
    if rows is not None:
        x = x.contiguous()
        return torch.cat([nf4_matmul(x[i:i + rows], qw, bias) for i in range(0, M, rows)])
    if M == 0:
        return x.new_empty((0, N))
    meta = _weight_meta(qw)  # also the int32 limit of the dequantize kernel
    strategy = select_strategy(M, N, K, x.dtype, x.device)
    strategies["forward", strategy] += 1
    if strategy == "dequant":
        launches["dequantize"] += 1
        return dequant_matmul(x, qw, bias)
    kernel = "gemv" if strategy == "gemv" else "gemm"
    if bias is not None:
        bias = bias.contiguous()
    launches[kernel] += 1
    words, tensors = _gemv_operands(qw)
    if words is not None:
        if kernel == "gemv":
            return _gemv_words(x, words, tensors, qw, bias, meta)
        return _gemm_words("forward", x, words, tensors, qw, bias, meta)
    args = (*tensors, bias if bias is not None else qw.code)
    common = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.device), **meta)
    if kernel == "gemv":
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), META["SPLIT_K"])  # noqa: E731
        _nf4_gemv_kernel[grid](x, *args, y, M, N, K, _m_bucket(M), x.stride(0), x.stride(1),
                               **common)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    kernel_fn, cfg = _general_kernel(_nf4_gemm_kernel, "forward")
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    kernel_fn[grid](x, *args, y, M, N, K, _m_bucket(M), x.stride(0), x.stride(1), **common, **cfg)
    return y


def nf4_matmul_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W`` for 2-D ``grad_y`` [M, N] (any strides); returns a contiguous
    [M, K] tensor of ``grad_y.dtype``."""
    M, N = grad_y.shape
    K = qw.shape[1]
    rows = _int32_row_chunks(grad_y, K)
    if rows is not None:
        grad_y = grad_y.contiguous()
        return torch.cat([nf4_matmul_grad_input(grad_y[i:i + rows], qw) for i in range(0, M, rows)])
    if M == 0:
        return grad_y.new_empty((0, K))
    meta = _weight_meta(qw)
    # No GEMV for grad-input: "gemv" and "fused" both run the fused kernel.
    if select_strategy(M, N, K, grad_y.dtype, grad_y.device) == "dequant":
        strategies["grad_input", "dequant"] += 1
        launches["dequantize"] += 1
        return dequant_grad_input(grad_y, qw)
    strategies["grad_input", "fused"] += 1
    launches["grad_input"] += 1
    words, tensors = _gemv_operands(qw)
    if words is not None:
        return _gemm_words("grad_input", grad_y, words, tensors, qw, None, meta)
    gx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
    kernel_fn, cfg = _general_kernel(_nf4_grad_input_kernel, "grad_input")
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    kernel_fn[grid](grad_y, *tensors, gx, M, N, K, _m_bucket(M), grad_y.stride(0),
                    grad_y.stride(1), DOT_FP32=dot_in_fp32(grad_y.device), **meta, **cfg)
    return gx
