"""Offloaded checkpoints: with gradient checkpointing, each layer's input waits
for the backward in (pinned) host memory instead of on the GPU.

Why a hook of our own and not ``torch.autograd.graph.save_on_cpu``: both move
the same tensors. Non-reentrant ``torch.utils.checkpoint`` keeps a layer's
inputs as saved tensors of a no-op autograd Function, saved before its own
hooks take over inside the region, so ``save_on_cpu`` around the checkpoint
(transformers' ``activation_checkpointing_enable(offload=True)``) sees exactly
the layer inputs (``tests/test_offload.py`` counts the same bytes as ours).
But ``save_on_cpu`` copies to the host synchronously on the compute stream when
the tensor is saved, and copies back only when the recompute unpacks it, so
both copies sit on the critical path; transformers also asks for pinned memory
unconditionally, which fails where there is no CUDA. The hook here copies on a
side stream and starts bringing a layer's input back one layer ahead. Which of
the two is faster on a GPU is not measured yet (no GPU in this session).

So :func:`offloading` wraps the checkpoint function itself: the layer runs on
its real input (the autograd graph to that input is the ordinary one), then
the input is copied to host memory and the one reference checkpoint would have
kept is dropped. When the backward reaches the layer and checkpoint recomputes
it, the input comes back. On CUDA the copies run on a side stream into pinned
memory, and the copy back of layer ``i - 1``'s input starts when layer ``i``'s
recompute begins, so it overlaps that layer's work. On the CPU there is no
device to leave: the "host copy" is a fresh tensor and the original is
dropped; on the meta device only the bytes are recorded. :class:`OffloadStats`
counts what moved either way.

:func:`offload_checkpoints` installs it on a transformers model so that it
survives checkpointing being turned on again (``Trainer`` and ``SFTTrainer`` do
with ``gradient_checkpointing=True``): it wraps ``_set_gradient_checkpointing``,
which ``activation_checkpointing_enable`` and its older name
``gradient_checkpointing_enable`` both end in.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable

import torch

_ATTR = "_qlora_triton_offload"


@dataclasses.dataclass
class OffloadStats:
    """What the hook moved: tensors and bytes sent to the host, brought back,
    and the most host bytes held at once."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    restored_tensors: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0

    def _add(self, nbytes: int) -> None:
        self.offloaded_tensors += 1
        self.offloaded_bytes += nbytes
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)


class _Stash:
    """One checkpointed layer input: on the device until the layer's forward
    is done, then on the host until its recompute."""

    def __init__(self, tensor: torch.Tensor, offloader: "Offloader") -> None:
        self.tensor: torch.Tensor | None = tensor
        self.requires_grad = tensor.requires_grad
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.host: torch.Tensor | None = None
        self.ready: torch.Tensor | None = None  # prefetched back to the device
        self.offloader = offloader
        self.previous = offloader.last and weakref.ref(offloader.last)
        offloader.last = self
        self._finalizer = None

    def offload(self) -> None:
        """After the forward: to the host, dropping the device reference."""
        t, self.tensor = self.tensor, None
        stats, stream = self.offloader.stats, self.offloader.stream(self.device)
        if t.device.type == "meta":
            pass  # bytes only
        elif stream is not None:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t.detach(), non_blocking=True)
            t.record_stream(stream)  # the allocator reuses t's memory only after the copy
        else:
            self.host = t.detach().clone()
        stats._add(self.nbytes)
        # host bytes are released when the stash goes (restored, or its graph freed)
        self._finalizer = weakref.finalize(self, _release, stats, self.nbytes)

    def prefetch(self) -> None:
        """Start the copy back to the device (no-op if already started or never offloaded)."""
        if self.ready is not None or self.tensor is not None or self.host is None:
            return
        stream = self.offloader.stream(self.device)
        if stream is not None:
            with torch.cuda.stream(stream):
                self.ready = self.host.to(self.device, non_blocking=True)
        else:
            self.ready = self.host.to(self.device, copy=True)

    def take(self) -> torch.Tensor:
        """The input, for the forward (as given) or the recompute (brought back)."""
        if self.tensor is not None:
            return self.tensor
        if self.device.type == "meta":
            back = torch.empty(self.shape, dtype=self.dtype, device="meta")
        else:
            self.prefetch()
            back, self.ready = self.ready, None
            stream = self.offloader.stream(self.device)
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
                back.record_stream(torch.cuda.current_stream(self.device))
        self.host = None
        self.offloader.stats.restored_tensors += 1
        if self._finalizer is not None:
            self._finalizer()
        # the layer below runs next in the backward: start bringing its input back now
        previous = self.previous() if self.previous else None
        if previous is not None:
            previous.prefetch()
        return back.requires_grad_(self.requires_grad)


def _release(stats: OffloadStats, nbytes: int) -> None:
    stats.host_bytes -= nbytes


class Offloader:
    """The per-model state: statistics and the side stream per CUDA device."""

    def __init__(self) -> None:
        self.stats = OffloadStats()
        self.last: _Stash | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


def offloading(checkpoint_fn: Callable, offloader: Offloader) -> Callable:
    """Wrap a checkpoint function (``torch.utils.checkpoint.checkpoint`` with
    ``use_reentrant=False``, as a ``functools.partial`` or not) so that the first
    positional argument, the layer input, waits on the host."""
    if getattr(checkpoint_fn, "keywords", {}).get("use_reentrant", False):
        raise ValueError("gradient_checkpointing_kwargs: offloaded checkpoints need use_reentrant=False "
                         "(reentrant checkpointing keeps the input as a saved tensor of its own Function)")

    @functools.wraps(checkpoint_fn)
    def offloaded(function, *args, **kwargs):
        if kwargs.get("use_reentrant", False):
            raise ValueError("use_reentrant: offloaded checkpoints need use_reentrant=False")
        if not args or not isinstance(args[0], torch.Tensor):
            return checkpoint_fn(function, *args, **kwargs)
        stash = _Stash(args[0], offloader)

        def run(stash_: _Stash, *rest, **kw):
            return function(stash_.take(), *rest, **kw)

        out = checkpoint_fn(run, stash, *args[1:], **kwargs)
        if torch.is_grad_enabled():
            stash.offload()
        return out

    offloaded.qlora_triton_offload = checkpoint_fn  # the unwrapped function, for undoing
    return offloaded


def _layers(model: torch.nn.Module):
    return [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]


def offload_checkpoints(model: torch.nn.Module, enable: bool = True) -> OffloadStats | None:
    """Turn offloaded checkpoints on (or off, ``enable=False``) for a transformers
    model; returns the model's :class:`OffloadStats` (None when turned off).

    Checkpointing already enabled is wrapped now; checkpointing turned on later
    (``Trainer``'s) is wrapped as it happens.
    Idempotent."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    if hasattr(model, "get_base_model"):  # a PeftModel: the transformers model inside
        model = model.get_base_model()
    setter = getattr(model, "_set_gradient_checkpointing", None)
    if setter is None:
        raise TypeError(f"model: {type(model).__name__} is not a transformers PreTrainedModel "
                        "(no _set_gradient_checkpointing)")
    offloader: Offloader | None = getattr(model, _ATTR, None)
    if not enable:
        if offloader is not None:
            for layer in _layers(model):
                layer._gradient_checkpointing_func = getattr(layer._gradient_checkpointing_func,
                                                             "qlora_triton_offload",
                                                             layer._gradient_checkpointing_func)
            del model._set_gradient_checkpointing
            delattr(model, _ATTR)
        return None
    if offloader is not None:
        return offloader.stats
    offloader = Offloader()
    for layer in _layers(model):
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = offloading(layer._gradient_checkpointing_func, offloader)
    original = type(model)._set_gradient_checkpointing.__get__(model)

    def set_gradient_checkpointing(enable: bool = True, gradient_checkpointing_func: Callable | None = None,
                                   **kwargs):
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        if enable:
            gradient_checkpointing_func = offloading(gradient_checkpointing_func, offloader)
        return original(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs)

    model._set_gradient_checkpointing = set_gradient_checkpointing
    setattr(model, _ATTR, offloader)
    return offloader.stats
