"""How the suite measures: time, peak memory, and the machine's two ceilings.

On CUDA, time is ``triton.testing.do_bench``'s median (CUDA events around each
call, a warm-up first, and L2 flushed between calls); peak memory is
``torch.cuda.max_memory_allocated`` after a reset, counted from before the
case's tensors were built. On the CPU (``--smoke``) time is the median of a few
``time.perf_counter`` runs and there is no memory number.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable

import torch

L2_BYTES = 60 * 2**20  # H200's L2 is 50 MiB; round up so rotation always beats it


@dataclasses.dataclass
class Timer:
    """Times a zero-argument callable on ``device``; the settings are the
    do_bench budgets (ms) on CUDA and the repetition count on the CPU."""

    device: torch.device
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    cpu_reps: int = 3

    @property
    def name(self) -> str:
        return "triton.testing.do_bench median" if self.device.type == "cuda" else "time.perf_counter median"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of one call of ``fn``."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()  # warm-up: first-call costs (compilation, allocator, lazy imports) stay out
        samples = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def rotation_copies(nbytes: int, device: torch.device, cap: int = 16) -> int:
    """How many copies of a working set of ``nbytes`` to cycle through so that
    successive calls never find their inputs in L2 (1 on the CPU or when the
    set is already several times L2)."""
    if device.type != "cuda" or nbytes <= 0:
        return 1
    return max(1, min(cap, -(-2 * L2_BYTES // nbytes)))


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_memory(build: Callable[[], Callable[[], object]],
                   device: torch.device) -> tuple[Callable[[], object], float | None, float | None]:
    """Build one instance of a case, call it (after a warm-up call), and return
    (the callable, peak MB, resident MB); the suite times the same instance
    when it needs no rotation copies.

    peak: the caching allocator's peak during the call above what was
    allocated before the build: what the case keeps (weight in the provider's
    format, inputs, optimizer state) plus what the call allocates (outputs,
    workspace). Temporaries of the build itself (the dense weight a provider
    quantizes from) are freed before the peak is reset, so they do not count.
    resident: device memory in use after the call by ``cudaMemGetInfo``, which
    also sees what torch's allocator does not (CUDA managed memory of the paged
    optimizers, resident on the device). Both None on the CPU."""
    if device.type != "cuda":
        fn = build()
        fn()
        return fn, None, None
    free_device_memory(device)
    base_alloc = torch.cuda.memory_allocated(device)
    base_free, _ = torch.cuda.mem_get_info(device)
    fn = build()
    fn()  # warm-up: compilation, autotuning (and its scratch buffers), lazy optimizer state
    free_device_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
    free_after, _ = torch.cuda.mem_get_info(device)
    resident = max(0, base_free - free_after) / 2**20
    return fn, peak, resident


@dataclasses.dataclass
class Ceilings:
    """The two rates the floors are computed from, measured in the same run."""

    copy_gbps: float  # device copy: (bytes read + bytes written) / time
    matmul_tflops: float  # dense bf16 matmul on random data
    copy_bytes: int
    matmul_size: int


def measure_ceilings(timer: Timer, smoke: bool) -> Ceilings:
    """A big device copy and a big bf16 matmul, both on random data."""
    device = timer.device
    if device.type == "cuda" and not smoke:
        copy_elems, n = 2**30 // 2, 8192  # 1 GiB of bf16 each way; 8192^3 matmul
    else:
        copy_elems, n = 2**24 // 2, 512
    src = torch.randn(copy_elems, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_ms = timer(lambda: a @ b)
    del a, b
    free_device_memory(device)
    return Ceilings(copy_gbps=copy_bytes / (copy_ms * 1e-3) / 1e9,
                    matmul_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12,
                    copy_bytes=copy_bytes, matmul_size=n)
