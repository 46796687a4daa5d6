"""Which matmul strategy a call through an NF4 weight runs: the one place that decides.

* ``"gemv"``: the split-K decode GEMV (``M <= GEMV_MAX_M``); memory-bound, it
  reads the packed bytes once.
* ``"fused"``: the NF4 GEMM, decoding W tile by tile in registers; no dense
  copy of W ever exists.
* ``"dequant"``: our dequantize kernel writes W in x's dtype into one reused
  scratch buffer (:mod:`qlora_triton.ops.scratch`), then ``torch.addmm`` /
  ``torch.mm`` (cuBLAS on the GPU). Its transient memory is one largest layer
  in x's dtype.

The grad-input product (``grad_y @ W``) has no GEMV: ``"gemv"`` runs the fused
grad-input kernel there. ``"gemv"`` forced for more than ``GEMV_MAX_M`` rows
runs ``"fused"`` (the GEMV's tile is 16 rows); :data:`strategies` records what
actually ran.

Precedence: :func:`force_strategy` (innermost block wins), then the
``QLORA_TRITON_STRATEGY`` environment variable (read once, at import), then
the crossover tables :data:`CROSSOVER` (forward) and
:data:`GRAD_INPUT_CROSSOVER` (its shipped rows, or a table measured on
the GPU by ``python -m benchmarks.crossover``: :func:`load_crossover`, or
``QLORA_TRITON_CROSSOVER=path`` at import).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
from typing import Iterator, Literal

import torch

Strategy = Literal["gemv", "fused", "dequant"]
STRATEGIES = ("gemv", "fused", "dequant")
ENV_VAR = "QLORA_TRITON_STRATEGY"

# Largest M the split-K GEMV takes; its tile is 16 rows (the smallest tl.dot
# tile on tensor cores), so up to 16 rows cost the same bytes as one.
GEMV_MAX_M = 16

# Layers of fewer weights than this are "small" (below 4096 x 4096): the
# dequantize pass is a larger share of their time, so they cross over later.
_SMALL_LAYER = 4096 * 4096

# The smallest M that runs "dequant", per (GPU kind, shape bucket, dtype);
# None: never by default.
# MEASURED (forward, large layers, bf16/fp16): 1024, from the first H200 run
# (benchmarks/results/h200-2026-12-04/run1/crossover.json: forward plus
# grad-input of 4096x4096, 11008x4096, 4096x11008 and 28672x8192 under each
# strategy, M = 32..8192; dequant was faster on every shape from M = 1024 on,
# on 28672x8192 from M = 128, where the fused kernels ran 3-5x slower than the
# estimates below). The run timed the two products together, so only the
# forward table takes it (as load_crossover does); the grad-input start and
# the small-layer rows stay estimates: the small layers' timings were host
# time (about 0.3-0.5 ms per pair of calls whatever M) and decide nothing.
# The rest are compile-time
# estimates (scripts/sm90_sass.py --train, benchmarks/results/sm90-train-*:
# static SASS counts of our kernels, cuBLAS assumed at 790 TFLOP/s), not
# measurements; the GPU check has to time all three strategies and replace
# them. Estimates for bf16, H200, blocksize 64, double quant (4096x4096 up
# to 28672x8192, Triton 3.6):
# * dequant = our dequantize kernel (~1.4x its HBM floor of 2.52 B per
#   weight) + cuBLAS: 1.01-1.03x its floor at M >= 4096, 1.2x at M = 256.
# * fused (word-decoding GEMM): forward ~1.24x the flops at the tensor peak
#   once the grid is full, grad-input ~1.6x; at M = 64 it reads 0.53 B per
#   weight where dequant moves 4.5, so it is 2.6-4.4x faster there, and still
#   ~1.2-1.4x faster at M = 256.
# * They cross where fused's extra time (0.24x / 0.62x of the flops) equals
#   the dequantize pass: M ~ 1400 forward, ~530 grad-input, for every shape
#   above (both scale with N x K), so each product has its own start.
#   bitsandbytes 0.50 switches at M of about 16-64 on sm_90 with a slower
#   fused kernel.
# * Small layers (below 4096x4096) were not profiled: the same start.
# * fp32: the fused kernel's dot runs in tf32 on tensor cores, cuBLAS fp32
#   (tf32 off by default in torch) at the ~67 TFLOP/s fp32 rate: fused wins.
#   (With torch's default "highest" fp32 precision the fused kernel's dot is
#   full fp32 too, ops/launch.dot_precision: the GPU check has to time it.)
CROSSOVER: dict[tuple[str, str, torch.dtype], int | None] = {  # the forward product
    ("sm_90", "large", torch.bfloat16): 1024,  # measured, see above
    ("sm_90", "large", torch.float16): 1024,
    ("sm_90", "large", torch.float32): None,
    ("sm_90", "small", torch.bfloat16): 1400,
    ("sm_90", "small", torch.float16): 1400,
    ("sm_90", "small", torch.float32): None,
}
GRAD_INPUT_CROSSOVER: dict[tuple[str, str, torch.dtype], int | None] = {  # grad_y @ W
    ("sm_90", "large", torch.bfloat16): 530,
    ("sm_90", "large", torch.float16): 530,
    ("sm_90", "large", torch.float32): None,
    ("sm_90", "small", torch.bfloat16): 530,
    ("sm_90", "small", torch.float16): 530,
    ("sm_90", "small", torch.float32): None,
}
_TABLES = {"forward": "CROSSOVER", "grad_input": "GRAD_INPUT_CROSSOVER"}  # looked up at each call


def _table(op: str) -> dict:
    if op not in _TABLES:
        raise ValueError(f"op must be 'forward' or 'grad_input', got {op!r}")
    return globals()[_TABLES[op]]


def load_crossover(path: str | os.PathLike) -> dict[tuple[str, str, torch.dtype], int | None]:
    """Use a crossover table measured by ``python -m benchmarks.crossover`` (the GPU
    check runs it): its rows replace :data:`CROSSOVER`'s for the GPU kind it was
    measured on, in this process. A row's ``op`` ("forward", the default, or
    "grad_input") says which product's table it sets. Returns the rows it set,
    keyed (kind, bucket, dtype), with "grad_input" appended for that table. The environment variable
    ``QLORA_TRITON_CROSSOVER=path`` does this at import."""
    try:
        data = json.loads(open(path, encoding="utf-8").read())
        kind, rows = data["gpu_kind"], data["crossover"]
        new = {}
        for row in rows:
            dtype = getattr(torch, row["dtype"])
            start = row["dequant_from_m"]
            op = row.get("op", "forward")
            if op not in _TABLES:
                raise ValueError(f"row {row}: op must be 'forward' or 'grad_input'")
            if row["bucket"] not in ("small", "large") or dtype not in (torch.bfloat16, torch.float16,
                                                                       torch.float32):
                raise ValueError(f"row {row}")
            if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 1):
                raise ValueError(f"dequant_from_m {start!r}")
            key = (kind, row["bucket"], dtype)
            new[key if op == "forward" else (*key, op)] = start
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"crossover table {os.fspath(path)!r}: not a table of benchmarks.crossover ({err})") from None
    if not isinstance(kind, str) or not kind.startswith("sm_"):
        raise ValueError(f"crossover table {os.fspath(path)!r}: measured on {kind!r}, not a CUDA GPU; "
                         "interpreted kernels say nothing about a GPU's crossover")
    for key, start in new.items():
        _table(key[3] if len(key) == 4 else "forward")[key[:3]] = start
    return new


# CUDA GPUs without rows of their own use this kind's; the CPU (the Triton
# interpreter) never picks "dequant" by default, so the fused kernels stay
# what CPU tests of the default path exercise.
_DEFAULT_GPU_KIND = "sm_90"
if os.environ.get("QLORA_TRITON_CROSSOVER"):
    load_crossover(os.environ["QLORA_TRITON_CROSSOVER"])

# How often each strategy ran, by (op, strategy) with op "forward" or
# "grad_input": tests and benchmarks read it to see what the dispatcher chose.
strategies: collections.Counter = collections.Counter()

_forced: Strategy | None = None
_assumed_kind: str | None = None


def _check(name: str, value) -> Strategy | None:
    if value is not None and value not in STRATEGIES:
        raise ValueError(f"{name} must be 'gemv', 'fused', 'dequant' or None, got {value!r}")
    return value


_env: str | None = os.environ.get(ENV_VAR) or None


def env_strategy() -> Strategy | None:
    """The strategy named by ``QLORA_TRITON_STRATEGY`` (unset or empty: None)."""
    return _check(f"the environment variable {ENV_VAR}", _env)


@contextlib.contextmanager
def force_strategy(strategy: Strategy | None) -> Iterator[None]:
    """Run every NF4 matmul inside the block with ``strategy`` ("gemv",
    "fused" or "dequant") on the Triton backend; ``None`` restores the
    default choice (environment variable, then the table). The reference
    backend ignores it."""
    global _forced
    _check("strategy", strategy)
    previous, _forced = _forced, strategy
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def assume_gpu_kind(kind: str | None) -> Iterator[None]:
    """Inside the block, :func:`select_strategy` answers as on a GPU of ``kind``
    (e.g. ``"sm_90"``) whatever the device: a static profile
    (scripts/sm90_sass.py) asks what the table picks on a GPU this machine
    lacks. ``None`` restores the device's own kind."""
    global _assumed_kind
    if kind is not None and not (isinstance(kind, str) and kind.startswith("sm_")):
        raise ValueError(f"kind must be a GPU kind like 'sm_90' or None, got {kind!r}")
    previous, _assumed_kind = _assumed_kind, kind
    try:
        yield
    finally:
        _assumed_kind = previous


@functools.lru_cache(maxsize=None)
def gpu_kind(device: torch.device) -> str:
    """``"sm_XY"`` for a CUDA device, ``"cpu"`` otherwise."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def shape_bucket(N: int, K: int) -> str:
    return "small" if N * K < _SMALL_LAYER else "large"


def select_strategy(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                    op: str = "forward") -> Strategy:
    """The strategy for ``x [M, K] @ W[N, K].T`` (``op`` "forward") or its
    grad-input ``grad_y [M, N] @ W`` ("grad_input", where "gemv" means its
    fused kernel) in ``dtype`` on ``device``; each product has its own
    crossover table (:data:`CROSSOVER`, :data:`GRAD_INPUT_CROSSOVER`)."""
    table = _table(op)
    strategy = _forced or env_strategy()
    if strategy is None:
        kind = _assumed_kind or gpu_kind(device)
        if kind != "cpu":
            bucket = shape_bucket(N, K)
            start = table.get((kind, bucket, dtype), table.get((_DEFAULT_GPU_KIND, bucket, dtype)))
            if start is not None and M >= start:
                return "dequant"
        strategy = "gemv"
    if strategy == "gemv" and M > GEMV_MAX_M:
        return "fused"
    return strategy
