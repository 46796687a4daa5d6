"""Running the launchers on meta tensors, for tensor accounting.

A meta tensor has a shape, a dtype and a size in bytes but no memory, so a
launcher called with meta tensors makes every allocation and every strategy
choice of a real call, and only its kernels cannot run. Inside
:func:`kernels_skipped`, a Triton launch (``kernel[grid](...)``, the one way
the launchers start kernels) whose first argument is a meta tensor does
nothing; any other launch, on any thread, runs as usual. Outside the block
Triton is untouched, so real calls pay nothing for it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from triton.runtime.jit import KernelInterface

_original_getitem = KernelInterface.__getitem__
_lock = threading.Lock()
_depth = 0


def _getitem(self, grid):
    launch = _original_getitem(self, grid)

    def run(*args, **kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return None  # nothing to read or write
        return launch(*args, **kwargs)

    return run


@contextlib.contextmanager
def kernels_skipped() -> Iterator[None]:
    """Triton launches on meta tensors are no-ops inside the block (nests)."""
    global _depth
    with _lock:
        if _depth == 0:
            KernelInterface.__getitem__ = _getitem
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                KernelInterface.__getitem__ = _original_getitem
