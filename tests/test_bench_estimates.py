"""benchmarks/estimates.py: the static sm_90 profile's figures beside the GPU cases."""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import estimates, report  # noqa: E402
from benchmarks.cases import Case  # noqa: E402


def test_estimate_reads_the_committed_profile():
    source, rows = estimates._report()
    assert source.startswith("results/sm90-sass-") and rows
    # A case the profile has, for each Triton version it was made with.
    want = next(r for r in rows if r["dtype"] == "bf16" and r["path"] == "aligned")
    case = Case("matmul_fwd", (want["N"], want["K"]), want["M"])
    est = estimates.estimate(case, want["triton"])
    assert est["triton"] == want["triton"]
    assert est["bound_over_floor"] == want["bound_over_floor"] and "estimate" in est["note"]
    # No row: another op, or a shape the profile does not cover.
    assert estimates.estimate(Case("matmul_grad_input", (want["N"], want["K"]), want["M"]), "3.6.0") is None
    assert estimates.estimate(Case("matmul_fwd", (123, 456), 1), "3.6.0") is None


def test_results_markdown_lists_the_estimate_beside_the_measurement():
    source, rows = estimates._report()
    r = next(r for r in rows if r["dtype"] == "bf16" and r["path"] == "aligned")
    est = estimates.estimate(Case("matmul_fwd", (r["N"], r["K"]), r["M"]), r["triton"])
    row = {"case": "matmul_fwd-x-M1", "provider": "qlora_triton", "x_floor": 1.7, "sass_estimate": est}
    (line,) = report.estimate_rows({"results": [row, {**row, "provider": "bf16"}]})
    assert line[0] == "matmul_fwd-x-M1" and line[-1] == "1.70"
    assert line[-2] == f"{est['bound_over_floor']:.2f}"
    json.dumps(row)  # the field stays JSON
