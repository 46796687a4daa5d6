"""The "dequant" strategy: W dequantized into one reused scratch buffer, then a
dense matmul (cuBLAS on the GPU, torch's CPU BLAS under the interpreter).

One buffer per (device, dtype), sized to the largest layer seen (or the largest
stack of layers one product reads: :func:`scratch_weights`, a fused block's
gate and up, or its q, k and v): a larger one replaces it (the old one is dropped before the new one is allocated, so two
are never alive), a smaller one uses its front. Nothing of it is saved for
backward, which dequantizes again, and every output is a fresh tensor, so the
buffer may be overwritten by the next call as soon as its matmul is queued.
:func:`release_scratch` frees the buffers.

Streams: every use of a buffer is serialized across CUDA streams. A call on
another stream than the buffer's previous use first makes its stream wait for
the work queued on that one (so no reader of the old contents is overtaken),
and records the new stream on the buffer (so the caching allocator does not
hand out its memory while that stream may still read it, once it is
released). Two streams therefore never use the buffer at the same time; work
that should overlap across streams should use the "fused" strategy.
"""

from __future__ import annotations

import torch

from ..weight import NF4Weight
from .dequantize import nf4_dequantize

# (device, dtype) -> [flat buffer, stream of its last use (None on the CPU)]
_buffers: dict = {}


def _stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def scratch_weight(qw: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W of ``qw`` in ``dtype``, dequantized into the (device, dtype) scratch
    buffer: a contiguous [N, K] view that the next call overwrites."""
    return scratch_weights((qw,), dtype)


def scratch_weights(qws, dtype: torch.dtype) -> torch.Tensor:
    """The weights ``qws`` (one device, one in_features K) stacked along the
    rows, ``[sum N, K]``, dequantized into the (device, dtype) scratch buffer:
    one dense operand for one matmul (a fused block's gate and up, or q, k
    and v). A contiguous view that the next call overwrites."""
    first = qws[0]
    numel = sum(qw.numel for qw in qws)
    key = (first.device, dtype)
    stream = _stream(first.device)
    entry = _buffers.get(key)
    if entry is None or entry[0].numel() < numel:
        _buffers.pop(key, None)
        entry = None  # the old buffer is freed here, before the new one exists
        entry = [torch.empty(numel, dtype=dtype, device=first.device), stream]
        _buffers[key] = entry
    elif stream is not None and entry[1] != stream:
        stream.wait_stream(entry[1])
        entry[0].record_stream(stream)
        entry[1] = stream
    start = 0
    for qw in qws:
        nf4_dequantize(qw, dtype, out=entry[0][start:start + qw.numel].view(qw.shape))
        start += qw.numel
    return entry[0][:numel].view(numel // first.shape[1], first.shape[1])


def release_scratch() -> None:
    """Free the scratch buffers of the "dequant" matmul strategy (the next
    call of that strategy allocates again). On the GPU the memory returns to
    torch's caching allocator (``torch.cuda.empty_cache()`` gives it back to
    the driver)."""
    _buffers.clear()


def scratch_buffers() -> dict:
    """``{(device, dtype): buffer}`` alive now (for tests and memory reports)."""
    return {key: entry[0] for key, entry in _buffers.items()}


def dequant_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T (+ bias)``, contiguous [M, N] in x's dtype (a fresh tensor).
    A strided ``x`` is copied first: BLAS may round differently on a strided
    operand, and the result must equal that of ``x.contiguous()``."""
    x = x if x.is_contiguous() else x.contiguous()
    w = scratch_weight(qw, x.dtype)
    if bias is None:
        return torch.mm(x, w.t())
    return torch.addmm(bias.to(x.dtype), x, w.t())


def dequant_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W``, contiguous [M, K] in grad_y's dtype (a fresh tensor); a
    strided ``grad_y`` is copied first (see :func:`dequant_matmul`)."""
    grad_y = grad_y if grad_y.is_contiguous() else grad_y.contiguous()
    return torch.mm(grad_y, scratch_weight(qw, grad_y.dtype))
