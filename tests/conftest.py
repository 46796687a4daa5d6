"""Backend selection for the whole suite.

Every op test takes the ``backend`` fixture and so runs twice: ``triton`` (the
Triton kernels: compiled on CUDA, interpreted on the CPU) and ``torch`` (the
plain-torch reference). On the CPU the Triton leg needs TRITON_INTERPRET=1 in
the environment before Python starts (scripts/test.sh sets it); without it
that leg is skipped with the reason, never silently passed.

``device`` is where op tests build their tensors (cuda on a GPU machine); the
device audit (tests/device_audit.py) fails, on a CPU-only machine, a Triton-leg
test that would hand a kernel a CPU tensor on a GPU machine. ``bnb`` gives a
test bitsandbytes (skipping that test alone without it) on its portable CPU
path. docs/testing.md says more.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import device_audit
import qlora_triton as qt
from qlora_triton import backend as _backend


def pytest_configure(config):
    # QLORA_TRITON_BNB_AVX512BF16=1 (or 0): run as if bitsandbytes had found
    # (or not) an AVX512-BF16 CPU, to check on any CPU that no test depends on it.
    simulate = os.environ.get("QLORA_TRITON_BNB_AVX512BF16")
    if simulate in ("0", "1"):
        try:
            import bitsandbytes.functional as bnb_functional
            import bitsandbytes.nn.modules as bnb_modules
        except ImportError:
            return
        for module in (bnb_functional, bnb_modules):
            module.has_avx512bf16 = lambda found=simulate == "1": found


def pytest_report_header(config):
    return (f"qlora_triton backends: TRITON_INTERPRET={int(_backend.INTERPRET)}, "
            f"cuda={torch.cuda.is_available()}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where op tests put their tensors: cuda on a GPU machine, else cpu.
    Build inputs with ``device=device`` or ``.to(device)`` (the audit in
    tests/device_audit.py knows this object)."""
    return device_audit.register_fixture_device(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def bnb(monkeypatch):
    """bitsandbytes for one test, skipped alone (not its module) when it is not
    installed, and on its portable CPU path: its AVX512-BF16 CPUs repack an
    eval-mode ``Linear4bit``'s weight in a layout that fails for some shapes
    (docs/testing.md), so a comparison must not depend on which CPU CI gets."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional  # noqa: F401  (bnb.functional for the tests)
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    return bitsandbytes


@pytest.fixture(params=["triton", "torch"])
def backend(request, device):
    if request.param == "triton" and not (device.type == "cuda" or _backend.INTERPRET):
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    with qt.force_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _no_meta_split_counters():
    # Tensor accounting (meta tensors through the launchers, e.g. an in-process
    # suite run) leaves the GEMV a split-K counter on the meta device; it holds
    # no values, and tests read every counter's.
    yield
    from qlora_triton.ops import matmul as ops_matmul

    for key in [key for key in ops_matmul._split_counters if key[0].type == "meta"]:
        del ops_matmul._split_counters[key]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh inputs, replayable
    # failures (crc32, not hash(): Python salts str hashes per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # The device audit watches the test's setup, call and teardown.
    with device_audit.tracking(device_audit.watches(item)) as violations:
        item.device_audit_violations = violations
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    violations = getattr(item, "device_audit_violations", None)
    if call.when == "call" and report.passed and violations:
        # the test caught the audit's error itself (pytest.raises(Exception), ...)
        report.outcome, report.longrepr = "failed", violations[0]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "backend" in callspec.params:
        report.user_properties.append(("backend", callspec.params["backend"]))


def pytest_terminal_summary(terminalreporter):
    """Say how many tests ran on each backend, so the log shows the Triton
    kernels themselves ran (interpreted on the CPU), not only the reference."""
    counts: dict[tuple[str, str], int] = {}
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            name = dict(getattr(report, "user_properties", ())).get("backend")
            if name is not None and (report.when == "call" or outcome == "skipped"):
                counts[(name, outcome)] = counts.get((name, outcome), 0) + 1
    if not counts:
        return
    mode = "compiled (CUDA)" if torch.cuda.is_available() else (
        "interpreted (TRITON_INTERPRET=1)" if _backend.INTERPRET else "not run (no CUDA, no interpreter)")
    terminalreporter.write_sep("-", "backends")
    for name, label in (("triton", f"Triton kernels, {mode}"), ("torch", "plain-torch reference")):
        parts = ", ".join(f"{counts.get((name, o), 0)} {o}" for o in ("passed", "failed", "skipped"))
        terminalreporter.write_line(f"backend={name}: {parts}  ({label})")


def _dist_pool(request, world_size: int):
    from dist_pool import DistPool

    pool = DistPool(world_size)
    request.addfinalizer(pool.close)
    return pool


@pytest.fixture(scope="session")
def dist2(request):
    """Two processes in one gloo (or NCCL) process group: ``dist2.run(fn, *args)``
    (tests/dist_pool.py)."""
    return _dist_pool(request, 2)


@pytest.fixture(scope="session")
def dist3(request):
    """Three processes in one process group (uneven shards)."""
    return _dist_pool(request, 3)
