"""The static sm_90 profile beside the GPU cases.

For a qlora_triton ``matmul_fwd`` row, the compile-time estimate of the same
(N, K, M) from the newest committed SASS profile
(``results/sm90-sass-*/report.json``, written by ``scripts/sm90_sass.py``; bf16
x, blocksize 64, double quant): the kernel and config the dispatcher picks, its
thread-instructions per weight and its bound over the HBM floor. These are
**estimates** from counting instructions, not measurements; a GPU run puts its
measured ``x_floor`` beside them.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from .cases import Case

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_KEEP = ("kernel", "config", "triton", "thread_instr_per_weight", "bound_over_floor", "grid_factor")


@functools.lru_cache(maxsize=None)
def _report() -> tuple[str, tuple[dict, ...]]:
    folders = sorted(p for p in RESULTS.glob("sm90-sass-*") if (p / "report.json").exists())
    if not folders:
        return "", ()
    path = folders[-1] / "report.json"
    rows = json.loads(path.read_text())["rows"]
    return str(path.relative_to(RESULTS.parent)), tuple(r for r in rows if "error" not in r)


def estimate(case: Case, triton_version: str) -> dict[str, Any] | None:
    """The profile's row for ``case`` (the run's Triton version when profiled,
    else Triton 3.6, the GPU machine's), or None when the profile has none."""
    if case.op != "matmul_fwd" or case.shape is None:
        return None
    source, rows = _report()
    n, k = case.shape
    same = [r for r in rows if (r["N"], r["K"], r["M"], r["dtype"], r["path"]) == (n, k, case.m, "bf16", "aligned")]
    for version in (triton_version, "3.6"):
        match = [r for r in same if r["triton"].split(".")[:2] == version.split(".")[:2]]
        if match:
            return {**{key: match[0][key] for key in _KEEP}, "source": source,
                    "note": "compile-time estimate (static SASS count), not a measurement"}
    return None
