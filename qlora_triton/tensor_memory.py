"""Peak memory of a block of work, by phase: on CUDA from the caching
allocator, anywhere else (the meta device above all) by tensor accounting.

* :class:`DeviceMemory` (CUDA): ``torch.cuda.max_memory_allocated``, reset at
  each phase.
* :class:`TensorMemory` (meta, CPU): a ``TorchDispatchMode`` that counts the
  bytes of every tensor storage an op creates while the storage is alive (a
  finalizer per storage uncounts it), plus the storages it was given to
  start with (a model's weights). An op's output that shares a storage with
  one of its inputs (a view, an in-place op) allocates nothing and is not
  counted. This is what the allocator would hold without fragmentation or
  caching, so a meta-device model gives a GPU-sized run's peak in seconds.

The package's ops (``qlora_triton::*``) run their Meta kernels (the launchers'
own code, kernels skipped: see :mod:`qlora_triton.library`) with the mode
still active, so the allocations inside an op (the "dequant" strategy's
scratch buffer, split-K partials, the dense matmul's output) are counted as
they happen; a mode otherwise sees only an op's outputs.

torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` runs on meta
tensors too, but sees only an op's outputs: for a 2048x1024 bf16 LoRA layer
at M = 64 it reports the same peak (2,074,692 bytes) under "fused" and
"dequant", missing the 4 MiB scratch buffer.

:class:`TensorMemory` also says where its peak went: each storage carries the
``tag`` the meter had when the storage was made (callers set ``meter.tag``,
e.g. from module hooks, and may ``retag`` a live tensor), and ``result()``
holds ``peak_breakdown``, bytes per tag at the moment of the peak.

Both meters give ``phase(name)`` blocks (one at a time, not nested) and
``result()``: ``{"kind", "peak_bytes", "baseline_bytes", "phases": {name:
{"start_bytes", "peak_bytes", "end_bytes"}}}`` (a phase entered again keeps
its largest peak).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_META = torch._C.DispatchKeySet(torch._C.DispatchKey.Meta)


class _Phases:
    """Per-phase peaks; subclasses say what the live bytes and peak are."""

    kind = ""

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}
        self.baseline = 0

    def live_bytes(self) -> int:
        raise NotImplementedError

    def _start_window(self) -> None:
        """Make the next ``_window_peak()`` the peak from now on."""

    def _window_peak(self) -> int:
        raise NotImplementedError

    def peak_bytes(self) -> int:
        raise NotImplementedError

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._start_window()
        start = self.live_bytes()
        try:
            yield
        finally:
            entry = {"start_bytes": start, "peak_bytes": self._window_peak(), "end_bytes": self.live_bytes()}
            old = self.phases.get(name)
            if old is None or entry["peak_bytes"] > old["peak_bytes"]:
                self.phases[name] = entry

    def result(self) -> dict:
        return {"kind": self.kind, "peak_bytes": self.peak_bytes(), "baseline_bytes": self.baseline,
                "phases": dict(self.phases)}


class DeviceMemory(_Phases):
    """The CUDA caching allocator's numbers for ``device`` (a context manager,
    like :class:`TensorMemory`)."""

    kind = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._peak = 0

    def __enter__(self) -> "DeviceMemory":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = self._peak = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes()

    def live_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _start_window(self) -> None:
        self.peak_bytes()  # fold the peak so far in before it is reset
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _window_peak(self) -> int:
        return self.peak_bytes()

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        self._peak = max(self._peak, torch.cuda.max_memory_allocated(self.device))
        return self._peak


class TensorMemory(_Phases, TorchDispatchMode):
    """Tensor accounting inside ``with TensorMemory(existing):``; ``existing``:
    tensors made before the block that count from the start (a model's
    parameters and buffers; shared storages count once)."""

    kind = "meta_tensor_accounting"

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        _Phases.__init__(self)
        TorchDispatchMode.__init__(self)
        self._live: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, tag)
        self._bytes = self._peak = self._phase_max = 0
        self.tag = "weights"
        self._by_tag: dict[str, int] = {}
        self._peak_tags: dict[str, int] = {}
        for t in existing:
            self._count(t)
        self.baseline = self._bytes
        self.tag = "other"

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl: views and their base share it
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = (size, self.tag)
        # torch keeps a storage's Python object alive as long as the storage
        # itself, so this runs when the memory would be freed.
        weakref.finalize(storage, self._free, key)
        self._bytes += size
        self._by_tag[self.tag] = self._by_tag.get(self.tag, 0) + size
        if self._bytes > self._peak:
            self._peak = self._bytes
            self._peak_tags = dict(self._by_tag)
        self._phase_max = max(self._phase_max, self._bytes)

    def _free(self, key: int) -> None:
        size, tag = self._live.pop(key, (0, ""))
        self._bytes -= size
        if size:
            self._by_tag[tag] -= size

    def retag(self, t: torch.Tensor, tag: str) -> None:
        """Count live tensor ``t``'s storage under ``tag`` from now on."""
        key = t.untyped_storage()._cdata
        if key in self._live:
            size, old = self._live[key]
            self._live[key] = (size, tag)
            self._by_tag[old] -= size
            self._by_tag[tag] = self._by_tag.get(tag, 0) + size

    def result(self) -> dict:
        out = super().result()
        out["peak_breakdown"] = {k: v for k, v in self._peak_tags.items() if v}
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qlora_triton" and args and getattr(args[0], "is_meta", False):
            with self:  # count the allocations inside the op as well
                out = func.redispatch(_META, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._count(t)
        return out

    def live_bytes(self) -> int:
        return self._bytes

    def _start_window(self) -> None:
        self._phase_max = self._bytes

    def _window_peak(self) -> int:
        return self._phase_max

    def peak_bytes(self) -> int:
        return self._peak


def memory_meter(device: torch.device, existing: Iterable[torch.Tensor] = ()) -> _Phases:
    """The meter for work on ``device``: :class:`DeviceMemory` on CUDA, else
    :class:`TensorMemory` (``existing`` counts from the start; on CUDA the
    allocator already holds it)."""
    device = torch.device(device)
    return DeviceMemory(device) if device.type == "cuda" else TensorMemory(existing)
