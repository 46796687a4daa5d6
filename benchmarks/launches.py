"""Counting the kernel launches of a call, on any device, without a GPU.

A *kernel-launching op* (the unit of ``benchmarks/bench_host.py`` and
``tests/test_host_path.py``) is one of:

* an ATen op that reaches the dispatcher below autograd, except views (the
  schema's outputs alias an input), metadata ops (``detach``, ``alias`` ...)
  and allocations without a fill (``empty*``): on CUDA each of the rest
  launches at least one kernel (a copy, a fill, a GEMM);
* a Triton kernel launch of ``qlora_triton`` (a ``JITFunction.run``, or
  ``InterpretedFunction.run`` under TRITON_INTERPRET=1, with ``warmup=False``:
  the one call every launch path ends in, autotuned or not).

A ``qlora_triton::*`` op is not counted itself: its implementation runs with
counting still on, so the fills, casts and Triton kernels inside it are what
is counted.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_NO_KERNEL = {"detach", "alias", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_same_size", "empty", "empty_strided", "empty_like",
              "new_empty", "new_empty_strided", "empty_permuted"}
_LEAF_LAUNCHERS = (JITFunction, InterpretedFunction)


def launches_nothing(func: torch._ops.OpOverload) -> bool:
    """Whether ATen op ``func`` is a view, a metadata op or a bare allocation."""
    if func._schema.name.split("::", 1)[1] in _NO_KERNEL:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _CountAten(TorchDispatchMode):
    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qlora_triton":
            # Run the op's own implementation (the backend key, below this
            # mode) with counting on, so what it launches is counted.
            device = next(a for a in args if isinstance(a, torch.Tensor)).device
            keys = torch._C.DispatchKeySet(torch._C._dispatch_key_for_device(device.type))
            with _CountAten(self.counts):
                return func.redispatch(keys, *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Below autograd (inside our ops) composite ops such as ``to`` and
            # ``reshape`` arrive whole: count what they decompose into.
            with _CountAten(self.counts):
                return func.decompose(*args, **kwargs)
        if not launches_nothing(func):
            self.counts["aten." + func._schema.name.split("::", 1)[1]] += 1
        return func(*args, **kwargs)


def _kernel_name(kernel) -> str | None:
    fn = kernel.fn
    module = getattr(fn, "__module__", "") or ""
    return fn.__name__.strip("_") if module.startswith("qlora_triton") else None


@contextlib.contextmanager
def _patched_launches(counts: collections.Counter | None, run_kernels: bool) -> Iterator[None]:
    originals = {cls: cls.__dict__["run"] for cls in _LEAF_LAUNCHERS}

    def wrap(cls):
        real = originals[cls]

        def run(self, *args, grid, warmup, **kwargs):
            name = _kernel_name(self)
            if name is None or warmup:
                return real(self, *args, grid=grid, warmup=warmup, **kwargs)
            if counts is not None:
                counts["triton." + name] += 1
            if run_kernels:
                # The interpreter's own tensor work is not a launch.
                with _disable_current_modes():
                    return real(self, *args, grid=grid, warmup=warmup, **kwargs)
            if callable(grid):  # the launcher's grid lambda still runs
                grid(kwargs)
            return None
        return run

    for cls in _LEAF_LAUNCHERS:
        cls.run = wrap(cls)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


@contextlib.contextmanager
def count_launches(run_kernels: bool = True) -> Iterator[collections.Counter]:
    """Count the kernel-launching ops (see the module docstring) inside the
    block, by name (``aten.<op>``, ``triton.<kernel>``); the block's calls run
    as usual (or, with ``run_kernels=False``, without launching any Triton
    kernel)."""
    counts: collections.Counter = collections.Counter()
    with _patched_launches(counts, run_kernels), _CountAten(counts):
        yield counts


@contextlib.contextmanager
def stub_triton_kernels() -> Iterator[None]:
    """Triton kernels of qlora_triton are not launched inside the block (their
    launcher's grid function still runs): host-time measurement without a GPU."""
    with _patched_launches(None, run_kernels=False):
        yield
