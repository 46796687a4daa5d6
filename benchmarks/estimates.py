"""The static sm_90 profile beside the GPU cases.

For a qlora_triton ``matmul_fwd`` row at M <= 16 (the decode GEMVs), the
compile-time estimate of the same kernel, (N, K, M) *and launch config* from
the newest committed profile that has it (``results/sm90-sass-*`` and
``results/sm90-decode-*``, ``report.json``, written by ``scripts/sm90_sass.py``;
bf16 x, blocksize 64, double quant): its thread-instructions per weight and its
bound over the HBM floor. A row for another config says nothing about the one
that ran, so none is returned then (the first H200 run showed bench rows
quoting an older profile's config). These are **estimates** from counting
instructions, not measurements; a GPU run puts its measured ``x_floor`` beside
them.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from .cases import Case

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_KEEP = ("kernel", "config", "triton", "thread_instr_per_weight", "bound_over_floor", "grid_factor")
# Kept where the profile has them (the bound model of 2026-12-04 on): which bound binds, and the floor.
_KEEP_IF_THERE = ("binding", "floor_us")


@functools.lru_cache(maxsize=None)
def _report() -> tuple[tuple[str, dict], ...]:
    """(source, row) of every committed profile row, the newest folder first
    (folders sort by the date in their name)."""
    folders = [p for pattern in ("sm90-sass-*", "sm90-decode-*") for p in RESULTS.glob(pattern)
               if (p / "report.json").exists()]
    folders.sort(key=lambda p: p.name.split("-", 2)[-1], reverse=True)
    return tuple((str((p / "report.json").relative_to(RESULTS.parent)), r) for p in folders
                 for r in json.loads((p / "report.json").read_text())["rows"] if "error" not in r)


def config_label(cfg) -> str:
    """A ``triton.Config`` of the GEMVs as the profile names it: "128x64 w1 s1 SPLIT_K=16"."""
    kw = cfg.kwargs
    return f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} SPLIT_K={kw['SPLIT_K']}"


def launched_config(case: Case) -> str | None:
    """The GEMV config this machine's launcher picks for ``case`` (bf16, blocksize
    64, compiled Triton), or None when the case is not a decode GEMV."""
    if case.op != "matmul_fwd" or case.shape is None or case.m is None or case.m > 16:
        return None
    from qlora_triton.ops import tuned_sm90

    kernel = "fma" if case.m <= tuned_sm90.GEMV_FMA_MAX_M else "dot"
    return config_label(tuned_sm90.gemv_config(kernel, case.shape[0], case.shape[1], 64, False))


def estimate(case: Case, triton_version: str, config: str | None) -> dict[str, Any] | None:
    """The newest profile row for ``case`` run with ``config`` (a
    :func:`config_label`) on ``triton_version`` (major.minor), or None when no
    profile has that row."""
    if case.op != "matmul_fwd" or case.shape is None or config is None:
        return None
    n, k = case.shape
    for source, r in _report():
        if ((r["N"], r["K"], r["M"], r["dtype"], r["path"], r["config"]) == (n, k, case.m, "bf16", "aligned", config)
                and r["triton"].split(".")[:2] == triton_version.split(".")[:2]):
            return {**{key: r[key] for key in _KEEP}, **{key: r[key] for key in _KEEP_IF_THERE if key in r},
                    "source": source,
                    "note": "compile-time estimate (static SASS count) of the config that ran, not a measurement"}
    return None
