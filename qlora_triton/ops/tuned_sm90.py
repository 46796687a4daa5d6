"""The launch-config table of the matmul kernels for sm_90 (H100/H200), the only
one: every GEMV, GEMM and grad-input launcher (:mod:`.gemv`, :mod:`.gemm`,
:mod:`.grad_input`) asks it for its config (other CUDA GPUs use it too until
they get a table of their own), and its candidate lists are what
``QLORA_TRITON_AUTOTUNE=1`` times. Keyed by shape, so that a first call
compiles one config instead of timing a dozen.

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

# Largest M the FMA GEMV (no tl.dot) takes: every row of x costs it one FFMA
# per weight. Profiled (Triton 3.6, bf16, issue 22's kernels): 4.6
# thread-instructions per weight at M = 1 (32x256), 7.4 at M = 2 and 11.7 at
# M = 4 (16x256); the tensor-core GEMV in the A fragment's lanes costs
# 4.95-5.14 at any M <= 16, so it takes M >= 2.
GEMV_FMA_MAX_M = 1
_MIN_PROGRAMS = 256  # about 2 per SM (the per-element-decode GEMV's split)

# The word GEMVs' tiles per kernel: (BLOCK_N, warps, stages, thread-instructions
# per weight, registers, load/store-unit thread-instructions per weight, L1/TEX
# lines per weight), from the static profile (Triton 3.6, bf16, blocksize
# 64, double quant, K = 8192; scripts/sm90_sass.py, benchmarks/results/sm90-decode-*).
# Both kernels load the next trip's words and stored scales in registers
# themselves (ops/gemv.PREFETCH_TRIPS, num_stages 1: no asynchronous copies,
# which would stage the words in shared memory).
# * "fma" (M = 1): one warp per program, because the codebook lookup is a
#   shuffle within the warp; BLOCK_K = 256: a lane reads a 16-byte piece of a
#   row, 8 lanes a row's 128 bytes, so a warp load is 4 whole lines (the
#   H200 found the old lane-per-row loads, 32 lines each, bound by L1/TEX);
#   a lane holds BLOCK_N / 4 rows. Figures of the issue-22 kernel (whole
#   trips, EVEN_K; registers of bf16 x): 32 rows amortize x's conversion,
#   the loop and its addresses over 8 rows per lane at 128 registers (16
#   programs, 4 warps per scheduler); the 2026-12-04b kernel took 5.43 at 16
#   rows and 5.09 at 32 rows (254 registers).
# * "dot" (2 <= M <= 16): W tile decoded in registers as the wgmma's A
#   operand, x^T (16 columns) the B operand in shared memory; BLOCK_K = 256
#   whatever the blocksize: the words are loaded in the A fragment's own
#   lanes (a lane reads 16 bytes of a row per run, a quad a row's 128 bytes,
#   8 rows = 8 lines per warp load; no shared memory for the decoded tile),
#   a scale per 32-column run multiplied into the tile. 16 rows per warp:
#   the 128-row tile takes 8 warps (two warpgroups sharing x^T), which
#   halves x's loads and stores per weight against the 64-row tile. Figures
#   of the 2026-12-04c kernel (bf16 x: the scale multiplies packed pairs).
# Triton 3.9 lowers the same code differently: for the FMA kernel its gather
# layout gives a lane as many table entries as it holds rows, so a lookup
# becomes 2+ shuffles and selects, the wide tiles spill there, and x goes
# through shared memory (the tensor-core kernel keeps one shuffle per weight
# there; x^T's store to shared memory costs more instructions). Other
# versions than 3.6 (the GPU machine's) get the tiles that neither spill nor
# multiply the shuffles.
_TILES_36 = {"fma": [(16, 1, 1, 4.89, 72, 1.16, 0.0175), (32, 1, 1, 4.64, 128, 1.14, 0.0155),
                     (8, 1, 1, 5.5, 64, 1.19, 0.0214)],
             "dot": [(128, 8, 1, 4.95, 128, 1.16, 0.0229), (64, 4, 1, 5.14, 128, 1.23, 0.0268)]}
_TILES_OTHER = {"fma": [(16, 1, 1, 7.2, 142, 1.42, 0.0507), (8, 1, 1, 10.2, 72, 2.23, 0.0233)],
                "dot": [(128, 8, 1, 5.34, 128, 1.3, 0.0316), (64, 4, 1, 5.88, 168, 1.3, 0.0316)]}
# K columns per trip: both GEMVs read 128 contiguous bytes of each row per
# trip whatever the blocksize (a scale per 32 columns; ops/gemv.py).
_BLOCK_K = {"fma": 256, "dot": 256}
_TILES = _TILES_36 if triton.__version__.startswith("3.6.") else _TILES_OTHER


def _block_k(kernel: str, blocksize: int) -> int:
    """K columns per trip of GEMV ``kernel`` on weights of ``blocksize``."""
    return _BLOCK_K[kernel]


# Any split of K up to 32 (not only powers of two): the one that deals the
# grid's warps most evenly to the 528 schedulers.
_SPLITS = range(1, 33)


# The bound model of scripts/sm90_sass.py (H200), used here to pick a split.
_CLOCK_HZ = 1.98e9
_HBM_BYTES_PER_S = 4.3e12
_LATENCY_S = 700e-9
# L1/TEX: SM clocks per 128-byte line a warp's load touches (global lines and
# shared-memory wavefronts), fitted on the H200's ncu cycles of the 64x64 FMA
# and 128x64 tensor-core GEMVs at 28672x8192 (sm90_sass.L1_CLOCKS_PER_LINE).
_L1_CLOCKS_PER_LINE = 1.8
_DEPTH = {"fma": 2, "dot": 2}  # trips of loads in flight per program (the prefetch)
# Calibration from the first GPU run (H200, Triton 3.6, bf16, graph-replayed
# sweep of every tile and split at 4096x4096, 8192x8192 and 28672x8192;
# benchmarks/results/h200-2026-12-04/diag.jsonl): a scheduler issued at full
# rate only with about 3 resident warps. Fewer left it idle on the decode's
# dependent shuffles and loads: the 2-warp-per-scheduler tiles (128-row FMA,
# 256-row tensor-core) measured 1.0-1.2x slower than the 3-warp ones (64-row
# FMA, 128-row tensor-core) that the instruction counts alone put 5-14% behind.
_WARPS_TO_HIDE_LATENCY = 3


# The candidate lists below are built once (lru_cache; callers never change
# them): the launchers pass them on every call, and at M = 1 host time is the cost.
@functools.lru_cache(maxsize=None)
def gemv_configs(kernel: str) -> tuple[triton.Config, ...]:
    """The candidates of GEMV ``kernel`` ("fma" or "dot") for the autotuner
    (:func:`prune_gemv` drops what :func:`allowed` refuses)."""
    return tuple(_config(t[0], k, s, t[1], t[2]) for t in _TILES[kernel]
                 for k in (_BLOCK_K[kernel] // 2, _BLOCK_K[kernel])
                 for s in (1, 2, 4, 8, 16))


def allowed(cfg: triton.Config, blocksize: int, x_fp32: bool, kernel: str = "dot") -> bool:
    """Whether a config of GEMV ``kernel`` may run: any blocksize (both take a
    scale per 32 columns); the tensor-core one no tile over 64 rows for fp32
    x (its full-fp32 dot runs on the FMA units with the operands in
    registers: the 128-row tile spills 16 B with a bias, sm90_compile, Triton
    3.9)."""
    if kernel == "fma":
        return True
    return not (x_fp32 and cfg.kwargs["BLOCK_N"] > 64)


def prune_gemv(configs, named_args, **kwargs) -> list[triton.Config]:
    """Autotune pruner: the configs :func:`allowed` for this launch."""
    args = {**named_args, **kwargs}
    x_fp32 = args["x_ptr"].dtype == torch.float32
    kernel = "fma" if "ROWS" in args else "dot"  # only the FMA kernel has ROWS
    return [c for c in configs if allowed(c, args["BLOCKSIZE"], x_fp32, kernel)]


def gemv_estimate_s(N: int, K: int, rows: int, block_n: int, block_k: int, warps: int,
                    split: int, instr_per_weight: float, registers: int,
                    blocksize: int = 64, depth: int = 2, lsu_per_weight: float = 0.0,
                    l1_per_weight: float = 0.0) -> float:
    """A GEMV launch's time on an H200 by the profile's bound model: the largest
    of the busiest scheduler's issue time (the busiest SM's warp-programs
    dealt to its schedulers, at full rate only with _WARPS_TO_HIDE_LATENCY
    resident warps each), its load/store unit's time, its L1/TEX time (the
    lines its loads touch, _L1_CLOCKS_PER_LINE each: what bound both GEMVs on
    the H200), the memory latency (each
    trip costs 700 ns over the pipeline depth) and the weight and scale bytes
    at HBM bandwidth; then, with a split, the fp32 partial sums written and
    read back, after the main loop (measured additive: 28672x8192 at M = 16
    took 12 us longer at split 16 than at split 4). Compile-time counts with
    the GPU's calibration; a model for ranking configs, not a timing."""
    tiles = -(-N // block_n)
    programs = tiles * split
    trips = -(-(-(-K // block_k)) // split)
    busiest = -(-programs // SMS)
    occupancy = max(1, min(65536 // (-(-registers // 8) * 8 * 32 * warps), 64 // warps, 32))
    resident = min(busiest, occupancy)
    waves = -(-busiest // resident)
    per_warp_trip = instr_per_weight * block_n * block_k / 32 / warps  # warp-instructions
    per_scheduler = -(-busiest * warps // min(4, resident * warps))
    issue_rate = min(1.0, resident * warps / 4 / _WARPS_TO_HIDE_LATENCY)
    issue = per_scheduler * trips * per_warp_trip / _CLOCK_HZ / issue_rate
    lsu = busiest * trips * lsu_per_weight * block_n * block_k / 32 / _CLOCK_HZ
    # The same issue rate gates the L1: its requests come from the schedulers'
    # warps (H200 sweep, 28672x8192: the 256-row tensor-core tile, 2 warps per
    # scheduler, took 176-185 us where its lines alone give 138-158 us; the
    # 128-row FMA tile, also 2, took 101-104 us against 93: the factor ranks
    # both below the 3-warp tiles, as measured, and over-charges the second).
    l1 = (busiest * trips * l1_per_weight * block_n * block_k * _L1_CLOCKS_PER_LINE / _CLOCK_HZ
          / issue_rate)
    latency = waves * trips * _LATENCY_S / depth
    scale_bytes = N * K / blocksize * (1 + 4 / 256)
    partial = 2 * 4 * split * rows * N if split > 1 else 0
    return (max(issue, latency, lsu, l1, (N * K / 2 + scale_bytes) / _HBM_BYTES_PER_S)
            + partial / _HBM_BYTES_PER_S)


@functools.lru_cache(maxsize=None)  # a pure function of its arguments, asked on every call
def gemv_config(kernel: str, N: int, K: int, blocksize: int = 64, x_fp32: bool = False,
                interpret: bool = False) -> triton.Config:
    """GEMV ``kernel``'s config for an [N, K] weight: the tile and K split
    (BLOCK_K from :func:`_block_k`; at least one K tile per split) that
    :func:`gemv_estimate_s` puts fastest, the first such in tile order.
    Compile-time estimates (sm90_sass), to be calibrated on the GPU."""
    block_k = _block_k(kernel, blocksize)
    if interpret:  # small tiles, and a split so that CI runs the split epilogue
        return _config(32 if kernel == "fma" else 64, block_k, 2, 1 if kernel == "fma" else 4, 1)
    rows = 1 if kernel == "fma" else 16
    best = None
    for block_n, warps, stages, instr, regs, lsu, l1 in _TILES[kernel]:
        cfg0 = _config(block_n, block_k, 1, warps, stages)
        if not allowed(cfg0, blocksize, x_fp32, kernel):
            continue
        for split in _SPLITS:
            if split > 1 and (split - 1) * -(-K // block_k // split) * block_k >= K:
                continue  # the last split would get no K
            t = gemv_estimate_s(N, K, rows, block_n, block_k, warps, split, instr, regs, blocksize,
                                _DEPTH[kernel], lsu, l1)
            trips = -(-(-(-K // block_k)) // split)
            # Ties (within 0.1%) go to the larger split while each program keeps
            # at least 8 trips: more warps per scheduler for the same estimate.
            tie = best is not None and t <= best[0] * 1.001 and trips >= 8 and block_n == best[2]
            if best is None or t < best[0] * 0.999 or tie:
                best = (min(t, best[0]) if tie else t, _config(block_n, block_k, split, warps, stages),
                        block_n)
    if best is None:
        raise AssertionError("no GEMV tile allowed")
    return best[1]


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
# fp32 x: torch's default fp32 precision ("highest") runs the dot in full fp32
# (ops/launch.dot_precision), on the FMA units with its operands in registers:
# the 128- and 64x128-row tiles spill there (sm90_compile, Triton 3.9: 1.3-1.6
# KB), so fp32 x gets one 64x64 tile whatever the precision.
_GEMM_TILES_FP32 = {"forward": [(64, 64, 4, 3)], "grad_input": [(64, 64, 4, 3)]}
_SPLIT_KEY = {"forward": "SPLIT_K", "grad_input": "SPLIT_N"}


def _gemm_config(op: str, block_m: int, block_n: int, block_k: int, split: int, warps: int,
                 stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          _SPLIT_KEY[op]: split, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def gemm_configs(op: str, x_fp32: bool = False) -> tuple[triton.Config, ...]:
    """The autotune candidates of the word GEMM (``op`` "forward") or
    grad-input ("grad_input"); :func:`prune_gemm` keeps the allowed ones."""
    tiles = _GEMM_TILES_FP32[op] if x_fp32 else _GEMM_TILES[op]
    return tuple(_gemm_config(op, m, n, k, s, w, st) for m, n, w, st in tiles
                 for k in (32, 64) for s in (1, 2, 4))


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
    fp32 = x.dtype == torch.float32
    keep = [c for c in configs if gemm_allowed(c, args["BLOCKSIZE"], fp32)]
    if fp32:  # only the fp32 tiles
        fp32_tiles = {(t[0], t[1], t[2]) for op in _GEMM_TILES_FP32 for t in _GEMM_TILES_FP32[op]}
        keep = [c for c in keep
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) in fp32_tiles] or keep
    return keep


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
    tiles = [t for t in (_GEMM_TILES_FP32 if x_fp32 else _GEMM_TILES)[op]
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


# The per-element-decode kernels (K % blocksize != 0: blocks cross rows), one
# config each, and the candidates QLORA_TRITON_AUTOTUNE=1 times. Compiled for
# sm_90 with Triton 3.6 and 3.9 (scripts/sm90_compile.py; reports in
# benchmarks/results/sm90-compile-*): these are the tiles whose general decode
# needs at most 227 KB of shared memory and spills nothing for fp32/fp16/bf16 x
# with and without double quantization, fp32 with a TF32 dot (full-fp32 x
# runs "dequant" on such weights, ops/matmul.py) (that path gathers every element's
# byte and scale, and the pipeliner stages the gathers in shared memory; other
# tiles need 237-557 KB or spill 12 B-2.3 KB). (BLOCK_M, BLOCK_N, BLOCK_K,
# warps, stages), the shipped one first:
# * forward 128x128x32 w8 s4: 222 registers, 224 KB; 64x64x64 w4 s4: 207, 224 KB;
# * grad-input 128x64x64 w4 s3: 253 registers, 208 KB; 64x64x64 w4 s4: 204, 224 KB;
# * GEMV (16 rows) 16x64x64 w4 s3: 164 registers, 120 KB; 16x32x64 w2 s3: 200, 64 KB.
_GENERAL_TILES = {
    "forward": [(128, 128, 32, 8, 4), (64, 64, 64, 4, 4)],
    "grad_input": [(128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    "gemv": [(16, 64, 64, 4, 3), (16, 32, 64, 2, 3)],
}
_GENERAL_INTERPRET = {"forward": (64, 64, 64, 4, 1), "grad_input": (64, 64, 64, 4, 1),
                      "gemv": (16, 128, 64, 4, 1)}
def _general(op: str, tile: tuple, split: int = 1) -> triton.Config:
    bm, bn, bk, warps, stages = tile
    extra = {"SPLIT_K": split} if op == "gemv" else {"GROUP_M": 8}
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra},
                         num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def general_configs(op: str) -> tuple[triton.Config, ...]:
    """Autotune candidates of the per-element-decode kernel of ``op``
    ("forward", "grad_input" or "gemv")."""
    splits = (1, 2, 4, 8, 16) if op == "gemv" else (1,)
    return tuple(_general(op, t, s) for t in _GENERAL_TILES[op] for s in splits)


@functools.lru_cache(maxsize=None)
def general_config(op: str, N: int, K: int, interpret: bool = False) -> triton.Config:
    """The per-element-decode kernel's config for ``op`` on an [N, K] weight:
    the first tile of its list; the GEMV splits K (powers of two up to 16, at
    least 512 columns per split) until the grid has about 2 programs per SM.
    The interpreter gets one small tile (the GEMV split in two, so that CI
    runs its atomics)."""
    if interpret:
        return _general(op, _GENERAL_INTERPRET[op], 2 if op == "gemv" else 1)
    tile = _GENERAL_TILES[op][0]
    if op != "gemv":
        return _general(op, tile)
    tiles, split = -(-N // tile[1]), 1
    while tiles * split < _MIN_PROGRAMS and split < 16 and K // (2 * split) >= 512:
        split *= 2
    return _general(op, tile, split)
