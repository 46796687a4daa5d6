"""Shipped launch configs for sm_90 (H100/H200), keyed by shape bucket, so that
a first call compiles one config instead of timing a dozen.

The figures behind them are **compile-time estimates** (static SASS counts,
``scripts/sm90_sass.py``; benchmarks/results/sm90-sass-*), not GPU timings: a
GPU run has to calibrate them. Until then ``QLORA_TRITON_AUTOTUNE=1`` (read at
each call) times the candidates on the device instead. The interpreter always
gets its single config.
"""

from __future__ import annotations

import os

import triton

AUTOTUNE_ENV = "QLORA_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _fma(block_n: int, block_k: int = 64, split_k: int = 1) -> triton.Config:
    # One warp per program: the codebook lookup is a shuffle within the warp
    # that holds the rows (more warps per program made Triton move the nibbles
    # through shared memory to reach the gather's layout: 7.4 vs 4.5 thread
    # instructions per weight, sm90_sass, Triton 3.6).
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                         num_warps=1, num_stages=1)


SMS = 132  # H100 SXM / H200
_MIN_PROGRAMS = 256  # about 2 per SM


def gemv_fma_configs() -> list[triton.Config]:
    """The FMA GEMV's candidates for the autotuner."""
    return [_fma(n, 64, s) for n in (32, 64, 128) for s in (1, 2, 4, 8)]


def gemv_fma_config(N: int, K: int, rows: int, interpret: bool = False) -> triton.Config:
    """The FMA GEMV's config for an [N, K] weight and ``rows`` (1, 2, 4) rows of x.

    Profile (Triton 3.6, bf16, blocksize 64, double quant, M = 1): BLOCK_N 128
    issues 4.9 thread-instructions per weight (bound 1.23x the HBM floor), 64
    issues 5.4 (1.35x), 32 issues 6.5 (1.6x): a lane holds BLOCK_N / 32 rows,
    which share x's conversion to fp32. So the tile stays at 128 rows and K is
    split (in powers of two, up to 8, at least 512 columns per split) until the
    grid has about 2 programs per SM (>= 256); only layers too small for that
    shrink the tile."""
    if interpret:
        return _fma(32, 64, 2)
    for block_n in (128, 64, 32):
        tiles = triton.cdiv(N, block_n)
        split = 1
        while tiles * split < _MIN_PROGRAMS and split < 8 and K // (2 * split) >= 512:
            split *= 2
        if tiles * split >= _MIN_PROGRAMS or block_n == 32:
            return _fma(block_n, 64, split)
    raise AssertionError("unreachable")
