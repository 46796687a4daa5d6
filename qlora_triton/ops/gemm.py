"""The fused NF4 GEMM (the "fused" strategy's forward): ``y = x @ W.T (+ bias)``
for M > 16, decoding W tile by tile in registers (no dense copy of W).

* ``_nf4_gemm_words_kernel`` (``K % blocksize == 0``): computed transposed,
  ``y^T = W @ x^T``, so the decoded W tile is the wgmma's A operand; split-K
  for short grids with the epilogue of :mod:`.split`.
* ``_nf4_gemm_kernel`` for any other K: the per-element decode.

Configs: the one table, :mod:`.tuned_sm90`; launched through :func:`.launch.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET, dot_in_fp32
from ..weight import NF4Weight
from .cast import cast_rtne
from .decode import grouped_tile, nf4_code_table, nf4_w_words_scaled, nf4_x_wt
from .launch import dot_precision, launch
from .split import split_counter, split_epilogue
from .tuned_sm90 import (autotune_enabled, general_config, general_configs, gemm_config,
                         gemm_configs, prune_gemm)


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
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision (launch.dot_precision)
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
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        w = nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                rn, k0, N, K, stride_wn, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                DOUBLE_QUANT)
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                     mask=rm[None, :] < M, other=0.0)
        if DOT_FP32:
            acc += tl.dot(w, xt.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(w.to(x_ptr.dtype.element_ty), xt, input_precision=DOT_PRECISION)
    out = rm[None, :] * N + rn[:, None]
    out_ok = (rm[None, :] < M) & (rn[:, None] < N)
    split_epilogue(acc, rn[:, None] + 0 * rm[None, :], out, out_ok, bias_ptr, y_ptr, partial_ptr,
                   count_ptr, tile, pid_k, M, N, stride_b, HAS_BIAS, SPLIT_K)


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
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,     # cast dot operands to fp32 (interpreter only, see backend)
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision (launch.dot_precision)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = nf4_x_wt(x_ptr, stride_xm, stride_xk, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr,
                   code2_ptr, offset_ptr, rm, rn, 0, K, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCKSIZE,
                   BLOCKSIZE2, DOUBLE_QUANT, DOT_FP32, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], cast_rtne(acc, y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _words_launch(op: str, kernel, a: torch.Tensor, words: torch.Tensor, tensors: tuple,
                  qw: NF4Weight, bias: torch.Tensor | None, meta: dict) -> torch.Tensor:
    """The word GEMM (``op`` "forward": ``a`` = x [M, K]) or grad-input
    ("grad_input": ``a`` = grad_y [M, N]); one launch with the table's config."""
    N, K = qw.shape
    M = a.shape[0]
    out_cols = N if op == "forward" else K
    split_key = "SPLIT_K" if op == "forward" else "SPLIT_N"
    out_block = "BLOCK_N" if op == "forward" else "BLOCK_K"
    out = torch.empty((M, out_cols), dtype=a.dtype, device=a.device)
    cfg = gemm_config(op, M, N, K, qw.blocksize, a.dtype == torch.float32,
                      interpret=INTERPRET and a.device.type != "meta")
    candidates = gemm_configs(op, a.dtype == torch.float32)
    tuned = candidates if autotune_enabled() and not INTERPRET else (cfg,)
    splits = max(c.kwargs[split_key] for c in tuned)
    partial = (torch.empty((splits, M, out_cols), dtype=torch.float32, device=a.device)
               if splits > 1 else out)
    tiles = max(-(-M // c.kwargs["BLOCK_M"]) * -(-out_cols // c.kwargs[out_block]) for c in tuned)
    count = split_counter(a.device, tiles) if splits > 1 else out
    const = dict(BLOCKSIZE=meta["BLOCKSIZE"], BLOCKSIZE2=meta["BLOCKSIZE2"],
                 DOUBLE_QUANT=meta["DOUBLE_QUANT"], DOT_FP32=dot_in_fp32(a.device),
                 DOT_PRECISION=dot_precision(a.dtype))
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
    launch(kernel, grid, args, const, cfg, candidates, prune_gemm)
    return out


def gemm_words(x: torch.Tensor, words: torch.Tensor, tensors: tuple, qw: NF4Weight,
               bias: torch.Tensor | None, meta: dict) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by the word GEMM (``K % blocksize == 0``)."""
    return _words_launch("forward", _nf4_gemm_words_kernel, x, words, tensors, qw, bias, meta)


def gemm_general(x: torch.Tensor, tensors: tuple, qw: NF4Weight, bias: torch.Tensor | None,
                 meta: dict) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by the per-element-decode GEMM (any K)."""
    M, K = x.shape
    N = qw.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    args = (x, *tensors, bias if bias is not None else qw.code, y, M, N, K, x.stride(0), x.stride(1))
    const = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.device),
                 DOT_PRECISION=dot_precision(x.dtype), BLOCKSIZE=meta["BLOCKSIZE"],
                 BLOCKSIZE2=meta["BLOCKSIZE2"], DOUBLE_QUANT=meta["DOUBLE_QUANT"])
    cfg = general_config("forward", N, K, interpret=INTERPRET and x.device.type != "meta")
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    launch(_nf4_gemm_kernel, grid, args, const, cfg, general_configs("forward"))
    return y
