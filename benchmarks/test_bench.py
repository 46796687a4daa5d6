"""The suite's cases as pytest-benchmark tests (CUDA only):

    pytest benchmarks --benchmark-only [-k matmul_fwd] [--benchmark-json out.json]

Same cases and providers as ``python -m benchmarks``; pytest-benchmark does the
timing (host clock around a call that ends in ``torch.cuda.synchronize``), so
its numbers include launch overhead that ``do_bench``'s events do not. The
plain ``pytest`` run does not collect this file (testpaths = tests), and
without a GPU every test here is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import all_cases
from benchmarks.providers import (MAX_REL_ERR, PROVIDERS, Checked, NotApplicable, build, provider_status,
                                  rotation_bytes)
from benchmarks.timing import rotation_copies

pytest.importorskip("pytest_benchmark")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the benchmarks time CUDA kernels; no GPU here"),
]

CASES = all_cases(smoke=False)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bench(benchmark, case, provider):
    status = provider_status(provider)
    if status is not None:
        pytest.skip(f"{provider}: {status}")
    device = torch.device("cuda")
    torch.manual_seed(0)
    try:
        fn = build(provider, case, device, rotation_copies(rotation_bytes(provider, case), device))
    except NotApplicable as e:
        pytest.skip(f"{provider}: n/a ({e})")

    def call():
        fn()
        torch.cuda.synchronize()

    call()  # warm-up: compilation and autotuning stay out of the numbers
    if isinstance(fn, Checked):  # a wrong kernel must not post a time
        err = fn.check()
        assert err <= MAX_REL_ERR, f"rel_err {err:.3g} against fp32 on the same weight"
    benchmark.extra_info.update(case=case.id, provider=provider, bytes=case.bytes_moved(), flops=case.flops())
    benchmark.pedantic(call, rounds=20, warmup_rounds=3, iterations=1)
