"""Backend selection for the whole suite.

Every op test takes the ``backend`` fixture and so runs twice: ``triton`` (the
Triton kernels: compiled on CUDA, interpreted on the CPU) and ``torch`` (the
plain-torch reference). On the CPU the Triton leg needs TRITON_INTERPRET=1 in
the environment before Python starts (scripts/test.sh sets it); without it
that leg is skipped with the reason, never silently passed.
"""

from __future__ import annotations

import pytest
import torch

import qlora_triton as qt
from qlora_triton import backend as _backend


def pytest_report_header(config):
    return (f"qlora_triton backends: TRITON_INTERPRET={int(_backend.INTERPRET)}, "
            f"cuda={torch.cuda.is_available()}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["triton", "torch"])
def backend(request, device):
    if request.param == "triton" and not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    with qt.force_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh inputs, replayable failures.
    torch.manual_seed(hash(request.node.nodeid) % 2**31)
