"""Shipped launch configs for sm_90 (H100/H200), keyed by shape bucket, so that
a first call compiles one config instead of timing a dozen.

The figures behind them are **compile-time estimates** (static SASS counts,
``scripts/sm90_sass.py``; benchmarks/results/sm90-sass-*), not GPU timings: a
GPU run has to calibrate them. Until then ``QLORA_TRITON_AUTOTUNE=1`` (read at
each call) times the candidates on the device instead. The interpreter always
gets its single config.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

AUTOTUNE_ENV = "QLORA_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _config(block_n: int, block_k: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                         num_warps=warps, num_stages=stages)


SMS = 132  # H100 SXM / H200
_MIN_PROGRAMS = 256  # about 2 per SM

# (BLOCK_N, warps, stages) per kernel, best first (Triton 3.6, bf16, blocksize
# 64, double quant; thread-instructions per weight, bound over the HBM floor):
# * "fma" (M = 1): one warp per program, because the codebook lookup is a
#   shuffle within the warp that holds the rows (more warps made Triton move
#   the nibbles through shared memory to reach the gather's layout); a lane
#   holds BLOCK_N / 32 rows, which share x's conversion to fp32: 128 rows 4.9
#   (1.23x), 64 rows 5.4 (1.35x), 32 rows 6.5 (1.6x).
# * "dot" (2 <= M <= 16): 256 rows w4 s2 5.0 (1.48x, load/store unit and shared
#   memory: the words come through cp.async, x^T is the wgmma B operand in
#   shared memory); 256 rows w8 5.5 (1.51x: each warp restages x^T); 128 rows
#   w4 5.7 (1.51x); s3 at 256 rows needs 255 registers.
#
# Triton 3.9 lowers the same code differently: its gather layout gives a lane
# as many table entries as it holds rows, so a lookup becomes 2+ shuffles and
# selects, and the 128-row FMA tile (255 registers, 484-544 B spilled) and the
# 256-row dot tile (12 B spilled) spill. Other versions than 3.6 (the GPU
# machine's) get the tiles that neither spill nor multiply the shuffles there.
_TILES_36 = {"fma": [(128, 1, 1), (64, 1, 1), (32, 1, 1)],
             "dot": [(256, 4, 2), (128, 4, 3), (64, 4, 3)]}
_TILES_OTHER = {"fma": [(32, 1, 1)], "dot": [(64, 4, 3)]}
_TILES = _TILES_36 if triton.__version__.startswith("3.6.") else _TILES_OTHER


def gemv_configs(kernel: str) -> list[triton.Config]:
    """The candidates of GEMV ``kernel`` ("fma" or "dot") for the autotuner
    (:func:`prune_gemv` drops K tiles wider than the weight's blocksize)."""
    return [_config(n, k, s, w, st) for n, w, st in _TILES[kernel] for k in (32, 64)
            for s in (1, 2, 4, 8)]


def allowed(cfg: triton.Config, blocksize: int, x_fp32: bool) -> bool:
    """Whether a GEMV config may run: BLOCK_K <= blocksize (one block per row
    segment of a K tile), and no 256-row tile for fp32 x (its dot spills 32 B
    at 255 registers on Triton 3.6, sm90_compile)."""
    return cfg.kwargs["BLOCK_K"] <= blocksize and not (x_fp32 and cfg.kwargs["BLOCK_N"] > 128)


def prune_gemv(configs, named_args, **kwargs) -> list[triton.Config]:
    """Autotune pruner: the configs :func:`allowed` for this launch."""
    args = {**named_args, **kwargs}
    x_fp32 = args["x_ptr"].dtype == torch.float32
    return [c for c in configs if allowed(c, args["BLOCKSIZE"], x_fp32)]


@functools.lru_cache(maxsize=None)  # a pure function of its arguments, asked on every call
def gemv_config(kernel: str, N: int, K: int, blocksize: int = 64, x_fp32: bool = False,
                interpret: bool = False) -> triton.Config:
    """GEMV ``kernel``'s config for an [N, K] weight: the widest tile, with K
    split (powers of two up to 8, at least 512 columns per split) until the
    grid has about 2 programs per SM (>= 256); only layers too small for that
    take a narrower tile. BLOCK_K = min(64, blocksize). These are compile-time
    estimates (sm90_sass)."""
    block_k = min(64, blocksize)
    if interpret:  # small tiles, and a split so that CI runs the split epilogue
        return _config(32 if kernel == "fma" else 64, block_k, 2, 1 if kernel == "fma" else 4, 1)
    tiles_ = _TILES[kernel]
    tiles_ = [t for t in tiles_ if allowed(_config(t[0], block_k, 1, t[1], t[2]), blocksize, x_fp32)]
    for i, (block_n, warps, stages) in enumerate(tiles_):
        tiles = -(-N // block_n)
        split = 1
        while tiles * split < _MIN_PROGRAMS and split < 8 and K // (2 * split) >= 512:
            split *= 2
        if tiles * split >= _MIN_PROGRAMS or i == len(tiles_) - 1:
            return _config(block_n, block_k, split, warps, stages)
    raise AssertionError("unreachable")


# The word-decoding fused GEMM and grad-input (ops/matmul.py
# _nf4_gemm_words_kernel, _nf4_grad_input_words_kernel), K % blocksize == 0.
# (BLOCK_M, BLOCK_N, warps, stages) per op, tallest first; BLOCK_K =
# min(64, blocksize). Figures: benchmarks/results/sm90-train-* (compile-time
# estimates, sm90_sass --train).
# * 128x128x64 w8 s3 for M >= 128 when its grid fills half the SMs: 8 warps keep the wgmma asynchronous
#   across iterations (the decode of the next W tile overlaps the MMA; Triton
#   3.6 waits in the same iteration with 4 warps or a split). Forward 10.4
#   thread-instructions per weight, 142 registers, a trip ~1.2x its tensor
#   time (shared memory); grad-input 13.9 (the decoded tile's transpose costs
#   PRMTs), ~1.6x.
# * 64x128x64 w4 s4 below (and for BLOCK_K 32, where 8 warps fail to lower):
#   twice the programs for short grids; forward 7.4, grad-input 8.5.
_GEMM_TILES = {
    "forward": [(128, 128, 8, 3), (64, 128, 4, 4)],
    "grad_input": [(128, 128, 8, 3), (64, 128, 4, 4)],
}
_SPLIT_KEY = {"forward": "SPLIT_K", "grad_input": "SPLIT_N"}


def _gemm_config(op: str, block_m: int, block_n: int, block_k: int, split: int, warps: int,
                 stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          _SPLIT_KEY[op]: split, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


def gemm_configs(op: str) -> list[triton.Config]:
    """The autotune candidates of the word GEMM (``op`` "forward") or
    grad-input ("grad_input"); :func:`prune_gemm` keeps the allowed ones."""
    return [_gemm_config(op, m, n, k, s, w, st) for m, n, w, st in _GEMM_TILES[op]
            for k in (32, 64) for s in (1, 2, 4)]


def gemm_allowed(cfg: triton.Config, blocksize: int, x_fp32: bool) -> bool:
    """Whether a word-GEMM config may run (sm90_compile, Triton 3.6): BLOCK_K <=
    blocksize (one block per row segment); no 8-warp tile with BLOCK_K 32
    (Triton fails to lower it); for fp32 x no split of 4 (255 registers,
    64-104 B spilled) and no 128-row grad-input tile (234 KB of shared memory
    on Triton 3.9, over the 227 KB limit)."""
    kw = cfg.kwargs
    split = kw.get("SPLIT_K", kw.get("SPLIT_N"))
    return (kw["BLOCK_K"] <= blocksize and not (kw["BLOCK_K"] < 64 and cfg.num_warps > 4)
            and not (x_fp32 and (split > 2 or ("SPLIT_N" in kw and kw["BLOCK_M"] > 64))))


def prune_gemm(configs, named_args, **kwargs) -> list[triton.Config]:
    """Autotune pruner: the configs :func:`gemm_allowed` for this launch."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"] if "x_ptr" in args else args["gy_ptr"]
    return [c for c in configs if gemm_allowed(c, args["BLOCKSIZE"], x.dtype == torch.float32)]


@functools.lru_cache(maxsize=None)
def gemm_config(op: str, M: int, N: int, K: int, blocksize: int = 64, x_fp32: bool = False,
                interpret: bool = False) -> triton.Config:
    """The word GEMM's config for x [M, K] @ W[N, K]^T (``op`` "forward") or
    grad_y [M, N] @ W ("grad_input"): the 128-row tile when M fills it and its
    grid fills half the SMs, else the first allowed 64-row one; then the reduction split in two or four (at least
    1024 columns each) while the grid fills at most half the SMs (a split
    costs the wgmma its asynchrony, sm90_sass --train)."""
    block_k = min(64, blocksize)
    if interpret:  # small tiles, and a split so that CI runs the split epilogue
        return _gemm_config(op, 64, 64, block_k, 2, 4, 1)
    tiles = [t for t in _GEMM_TILES[op]
             if gemm_allowed(_gemm_config(op, t[0], t[1], block_k, 1, t[2], t[3]), blocksize, x_fp32)]
    out_cols, red = (N, K) if op == "forward" else (K, N)

    def programs(tile):
        return -(-M // tile[0]) * -(-out_cols // (tile[1] if op == "forward" else block_k))

    block_m, block_n, warps, stages = next(
        (t for t in tiles if t[0] <= 64 or (M >= t[0] and 2 * programs(t) >= SMS)), tiles[-1])
    programs = programs((block_m, block_n))
    split = 1
    while (2 * programs * split <= SMS and gemm_allowed(_gemm_config(op, block_m, block_n, block_k,
                                                                2 * split, warps, stages),
                                                   blocksize, x_fp32)
           and red // (2 * split) >= 1024):
        split *= 2
    return _gemm_config(op, block_m, block_n, block_k, split, warps, stages)
