"""CUDA unified (managed) memory for optimizer states: the only module that
makes native calls.

The helper library (kernels/managed_alloc.cu, built into
``qlora_triton/_managed_alloc.so`` on request, see setup.py) exports a
managed-memory alloc/free pair with ``CUDAPluggableAllocator``'s signatures
and a prefetch call. States are allocated from a ``torch.cuda.MemPool`` backed
by that allocator, so they are ordinary CUDA tensors (kernels, ``torch.save``,
``copy_`` all work) whose pages can live on the device or the host; paging is
explicit: :func:`prefetch_to_device` before the optimizer reads them,
:func:`evict_to_host` after (what that frees, as measured: docs/optimizers.md).

Why a MemPool and not a process-wide pluggable allocator: the latter replaces
torch's allocator for every tensor (and must be installed before any CUDA
allocation); a pool only serves the allocations made inside
``torch.cuda.use_mem_pool``. The pool's caching allocator keeps freed blocks
cached for reuse, like torch's own.

Oversubscribed managed memory can hang the GPU, so every allocation and every
prefetch to the device is first checked against ``torch.cuda.mem_get_info()``
free memory (minus :data:`HEADROOM_BYTES`) and refused with
:class:`ManagedMemoryError`; the helper itself also refuses an allocation that
exceeds free memory (a second line of defence).

On the CPU nothing here is used: states are plain tensors.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Iterable

import torch

HELPER_PATH = Path(__file__).with_name("_managed_alloc.so")
BUILD_COMMAND = "QLORA_TRITON_BUILD_CUDA=1 pip install --no-build-isolation -e ."
# Device memory kept free beyond any managed allocation or prefetch, for the
# CUDA context, cuBLAS workspaces and the allocations of forward/backward.
HEADROOM_BYTES = 256 << 20
_MIB = 1 << 20


class ManagedMemoryError(RuntimeError):
    """The managed-memory helper is missing, or a request would oversubscribe the device."""


class _Helper:
    """The loaded library, with its C signatures declared once."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.qlt_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.lib.qlt_prefetch.restype = ctypes.c_int
        self.lib.qlt_error_string.argtypes = [ctypes.c_int]
        self.lib.qlt_error_string.restype = ctypes.c_char_p

    def prefetch(self, tensor: torch.Tensor, device_index: int, stream: int) -> None:
        err = self.lib.qlt_prefetch(tensor.data_ptr(), tensor.numel() * tensor.element_size(), device_index, stream)
        if err != 0:
            where = "the host" if device_index < 0 else f"cuda:{device_index}"
            raise ManagedMemoryError(f"prefetch of {tensor.nbytes} bytes to {where} failed: "
                                     f"{self.lib.qlt_error_string(err).decode()} (is it a managed tensor?)")

    def last_prefetch_location(self, tensor: torch.Tensor) -> int:
        try:
            query = self.lib.qlt_last_prefetch_location
        except AttributeError as e:  # a helper built before this query existed
            raise ManagedMemoryError(f"{self.path} predates qlt_last_prefetch_location; rebuild it with "
                                     f"{BUILD_COMMAND}") from e
        device = ctypes.c_int(-2)
        err = query(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(tensor.nbytes), ctypes.byref(device))
        if err != 0:
            raise ManagedMemoryError(f"querying the location of {tensor.nbytes} bytes failed: "
                                     f"{self.lib.qlt_error_string(err).decode()} (is it a managed tensor?)")
        return device.value


def missing_helper_message(path: str | os.PathLike) -> str:
    return (f"paged optimizer states on CUDA need qlora_triton's managed-memory helper, which is not built "
            f"(looked for {path}). Build it (needs nvcc) from the repository root with:\n"
            f"    {BUILD_COMMAND}\n"
            f"or pass paged=False to keep the optimizer states in ordinary device memory.")


@functools.lru_cache(maxsize=None)
def _load_helper(path: str) -> _Helper:
    if not os.path.exists(path):
        raise ManagedMemoryError(missing_helper_message(path))
    try:
        return _Helper(path)
    except (OSError, AttributeError) as e:
        raise ManagedMemoryError(f"{missing_helper_message(path)}\n(the file exists but could not be loaded: {e})") from e


def helper(path: str | os.PathLike | None = None) -> _Helper:
    """The loaded helper library; :class:`ManagedMemoryError` saying how to build it when missing."""
    return _load_helper(str(path if path is not None else HELPER_PATH))


@functools.lru_cache(maxsize=None)
def _pool(device_index: int, path: str) -> "torch.cuda.MemPool":
    # Kept for the life of the process: the pool must outlive its tensors.
    if not hasattr(torch.cuda, "MemPool") or not hasattr(torch.cuda, "use_mem_pool"):
        raise ManagedMemoryError(f"torch {torch.__version__} has no torch.cuda.MemPool / use_mem_pool; "
                                 "paged states need a newer torch, or pass paged=False")
    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, "qlt_managed_alloc", "qlt_managed_free")
    with torch.cuda.device(device_index):
        return torch.cuda.MemPool(allocator.allocator())


def _segment_bytes(nbytes: int) -> int:
    """Device bytes the pool may request for a new ``nbytes`` block: torch's
    caching allocator serves requests up to 1 MiB from 2 MiB segments, up to
    10 MiB from 20 MiB segments, and rounds larger ones up to 2 MiB."""
    if nbytes <= _MIB:
        return 2 * _MIB
    if nbytes < 10 * _MIB:
        return 20 * _MIB
    return -(-nbytes // (2 * _MIB)) * 2 * _MIB


def check_fits(nbytes: int, device: torch.device, action: str) -> None:
    """Refuse (ManagedMemoryError) to place ``nbytes`` of managed memory on
    ``device`` unless it fits in free device memory with HEADROOM_BYTES to spare."""
    free, _total = torch.cuda.mem_get_info(device)
    if nbytes + HEADROOM_BYTES > free:
        raise ManagedMemoryError(
            f"refusing to {action} {nbytes / _MIB:.1f} MiB of managed optimizer state on {device}: only "
            f"{free / _MIB:.1f} MiB free and {HEADROOM_BYTES / _MIB:.0f} MiB are kept spare; oversubscribed "
            "managed memory can hang the GPU. Free device memory first, or optimize fewer parameters.")


def managed_empty(shape: Iterable[int] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialized tensor in CUDA managed memory on a CUDA ``device``
    (preferred location: that device); a plain tensor on any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    lib = helper()
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    check_fits(_segment_bytes(nbytes), device, "allocate")
    with torch.cuda.device(device), torch.cuda.use_mem_pool(_pool(device.index, lib.path), device):
        return torch.empty(tuple(shape), dtype=dtype, device=device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def prefetch_to_device(tensors: Iterable[torch.Tensor]) -> int:
    """Migrate managed CUDA tensors to their device, ordered on the current
    stream, after checking they fit in free device memory; returns the bytes moved."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return 0
    device = tensors[0].device
    nbytes = sum(t.nbytes for t in tensors)
    check_fits(nbytes, device, "prefetch")
    lib, stream = helper(), _stream(device)
    for t in tensors:
        lib.prefetch(t, t.device.index, stream)
    return nbytes


def last_prefetch_location(tensor: torch.Tensor) -> int:
    """Where the driver last prefetched a managed CUDA tensor's pages (its
    ``cudaMemRangeGetAttribute`` record): a device index, -1 for the host, -2
    for never (or to different places). Pages a kernel touched since may have
    moved on demand; this is the explicit paging's record, not a page walk."""
    return helper().last_prefetch_location(tensor)


def evict_to_host(tensors: Iterable[torch.Tensor]) -> int:
    """Migrate managed CUDA tensors to host memory, ordered on the current
    stream (after the kernels that used them); returns the bytes moved."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return 0
    lib, stream = helper(), _stream(tensors[0].device)
    for t in tensors:
        lib.prefetch(t, -1, stream)
    return sum(t.nbytes for t in tensors)
