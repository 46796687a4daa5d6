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
    rows = estimates._report()
    assert rows and all(source.startswith("results/sm90-") for source, _ in rows)
    # A case the profile has, for each Triton version it was made with, under its config.
    _, want = next((s, r) for s, r in rows if r["dtype"] == "bf16" and r["path"] == "aligned")
    case = Case("matmul_fwd", (want["N"], want["K"]), want["M"])
    est = estimates.estimate(case, want["triton"], want["config"])
    assert est["triton"] == want["triton"] and est["config"] == want["config"]
    assert est["bound_over_floor"] == want["bound_over_floor"] and "estimate" in est["note"]
    # No row: another config (what ran is not what was profiled), another op, an unprofiled shape.
    assert estimates.estimate(case, want["triton"], want["config"] + "0") is None
    assert estimates.estimate(case, want["triton"], None) is None
    assert estimates.estimate(Case("matmul_grad_input", (want["N"], want["K"]), want["M"]), "3.6.0",
                              want["config"]) is None
    assert estimates.estimate(Case("matmul_fwd", (123, 456), 1), "3.6.0", want["config"]) is None


def test_launched_config_names_the_gemv_config_as_the_profile_does():
    from qlora_triton.ops import tuned_sm90

    label = estimates.launched_config(Case("matmul_fwd", (4096, 4096), 1))
    cfg = tuned_sm90.gemv_config("fma", 4096, 4096, 64, False)
    assert label == (f"{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} "
                     f"SPLIT_K={cfg.kwargs['SPLIT_K']}")
    assert estimates.launched_config(Case("matmul_fwd", (4096, 4096), 17)) is None  # not a GEMV


def test_results_markdown_lists_the_estimate_beside_the_measurement():
    _, r = next((s, r) for s, r in estimates._report() if r["dtype"] == "bf16" and r["path"] == "aligned")
    est = estimates.estimate(Case("matmul_fwd", (r["N"], r["K"]), r["M"]), r["triton"], r["config"])
    row = {"case": "matmul_fwd-x-M1", "provider": "qlora_triton", "x_floor": 1.7, "sass_estimate": est}
    (line,) = report.estimate_rows({"results": [row, {**row, "provider": "bf16"}]})
    assert line[0] == "matmul_fwd-x-M1" and line[-1] == "1.70"
    assert line[-2] == f"{est['bound_over_floor']:.2f}"
    json.dumps(row)  # the field stays JSON
