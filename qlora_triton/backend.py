"""The one dispatch rule of the package.

* CUDA tensors run the compiled Triton kernels.
* CPU tensors run the same Triton kernels under Triton's interpreter when the
  process started with ``TRITON_INTERPRET=1`` (that is how CI tests them).
* Other CPU tensors run the plain-torch reference in :mod:`qlora_triton.reference`.

``force_backend`` overrides the rule inside a ``with`` block, for tests that
compare both paths in one process and for benchmarks of the reference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal

import torch

# Triton decides between compiled and interpreted kernels when ``@triton.jit``
# runs, i.e. when our ops modules are imported. Read the variable once, here, so
# the dispatch rule always agrees with what the kernels were built as.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

Backend = Literal["triton", "torch"]
_forced: Backend | None = None


@contextlib.contextmanager
def force_backend(backend: Backend | None) -> Iterator[None]:
    """Run the ops inside the block on ``backend`` ("triton" or "torch");
    ``None`` restores the default rule."""
    global _forced
    if backend not in ("triton", "torch", None):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def forced_backend() -> Backend | None:
    """The backend :func:`force_backend` set now (None: the default rule)."""
    return _forced


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs the Triton kernels."""
    triton_can_run = device.type == "cuda" or (device.type == "cpu" and INTERPRET)
    if _forced == "torch":
        return False
    if _forced == "triton" and not triton_can_run:
        raise RuntimeError(
            f"the Triton backend cannot run on {device} tensors in this process: "
            "use CUDA tensors, or start Python with TRITON_INTERPRET=1 for the CPU"
        )
    return triton_can_run


def dot_in_fp32(device: torch.device) -> bool:
    """Whether kernels should cast ``tl.dot`` operands to fp32.

    Triton 3.9's interpreter returns garbage for a bf16 x bf16 ``tl.dot``
    (relative error ~1e9) while fp16/fp32 dots are right. On the GPU the bf16
    dot is the fast path, so only the interpreter gets the cast; every other
    line of the kernels is the same code on both."""
    return INTERPRET and device.type == "cpu"


def use_liger(device: torch.device) -> bool:
    """Whether a model on ``device`` gets Liger-Kernel's RMSNorm, RoPE and
    fused linear cross-entropy (:mod:`qlora_triton.liger`), rather than the
    plain-torch path (transformers' own norm and RoPE, and the chunked
    :mod:`qlora_triton.linear_cross_entropy`).

    Liger's kernels are Triton for CUDA; they do not run under Triton 3.9's
    interpreter (its RMSNorm launcher calls ``eps.to`` on a Python float), so
    the CPU and the meta device of the memory accounting take the torch path,
    as does ``force_backend("torch")``."""
    if _forced == "torch" or torch.device(device).type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None
