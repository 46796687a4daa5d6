"""The fused NF4 grad-input (the backward of ``x @ W.T``): ``grad_x = grad_y @ W``,
decoding W tile by tile in registers (no dense copy of W). No GEMV: below the
crossover every M runs these kernels.

* ``_nf4_grad_input_words_kernel`` (``K % blocksize == 0``): ``grad_x^T = W^T @
  grad_y^T``, the decoded tile transposed in registers as the wgmma's A
  operand; split-N for short grids (:mod:`.split`).
* ``_nf4_grad_input_kernel`` for any other K: the per-element decode, walking N.

Configs: the one table, :mod:`.tuned_sm90`; launched through :func:`.launch.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET, dot_in_fp32
from ..weight import NF4Weight
from .cast import cast_rtne
from .decode import grouped_tile, nf4_code_table, nf4_w_tile, nf4_w_words_scaled
from .gemm import _words_launch
from .launch import dot_precision, launch
from .split import split_epilogue
from .tuned_sm90 import general_config, general_configs


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
    DOT_PRECISION: tl.constexpr,
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
    pid_m, pid_k = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    table = nf4_code_table(code_ptr)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    n_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLIT_N) * BLOCK_N
    n_start = pid_s * n_per_split
    for n0 in range(n_start, tl.minimum(n_start + n_per_split, N), BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        w = nf4_w_words_scaled(table, words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                rn, k0, N, K, stride_wn, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                DOUBLE_QUANT)
        gyt = tl.load(gy_ptr + rm[None, :] * stride_gm + rn[:, None] * stride_gn,
                      mask=(rm[None, :] < M) & (rn[:, None] < N), other=0.0)
        if DOT_FP32:
            acc += tl.dot(tl.trans(w), gyt.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(tl.trans(w.to(gy_ptr.dtype.element_ty)), gyt, input_precision=DOT_PRECISION)
    out = rm[None, :] * K + rk[:, None]
    out_ok = (rm[None, :] < M) & (rk[:, None] < K)
    split_epilogue(acc, out, out, out_ok, gx_ptr, gx_ptr, partial_ptr, count_ptr, tile, pid_s,
                   M, K, 0, False, SPLIT_N)


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
    # strides
    stride_gm, stride_gn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grad_x[M, K] = grad_y[M, N] @ W[N, K]: programs tile (M, K) and walk N.
    # The decoded tile is W[n0:n0+BLOCK_N, k0:k0+BLOCK_K] exactly as in the
    # forward, used untransposed; only the reduction axis differs.
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        gy = tl.load(gy_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = nf4_w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       rn, rk, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        if DOT_FP32:
            acc += tl.dot(gy.to(tl.float32), w, input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(gy, w.to(gy.dtype), input_precision=DOT_PRECISION)
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], cast_rtne(acc, gx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


def grad_input_words(grad_y: torch.Tensor, words: torch.Tensor, tensors: tuple,
                     qw: NF4Weight, meta: dict) -> torch.Tensor:
    """``grad_y @ W`` by the word grad-input (``K % blocksize == 0``)."""
    return _words_launch("grad_input", _nf4_grad_input_words_kernel, grad_y, words, tensors, qw,
                         None, meta)


def grad_input_general(grad_y: torch.Tensor, tensors: tuple, qw: NF4Weight,
                       meta: dict) -> torch.Tensor:
    """``grad_y @ W`` by the per-element-decode grad-input (any K)."""
    M, N = grad_y.shape
    K = qw.shape[1]
    gx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
    cfg = general_config("grad_input", N, K, interpret=INTERPRET and grad_y.device.type != "meta")
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    const = dict(DOT_FP32=dot_in_fp32(grad_y.device), DOT_PRECISION=dot_precision(grad_y.dtype),
                 BLOCKSIZE=meta["BLOCKSIZE"], BLOCKSIZE2=meta["BLOCKSIZE2"],
                 DOUBLE_QUANT=meta["DOUBLE_QUANT"])
    args = (grad_y, *tensors, gx, M, N, K, grad_y.stride(0), grad_y.stride(1))
    launch(_nf4_grad_input_kernel, grid, args, const, cfg, general_configs("grad_input"))
    return gx
