"""The split-K (split-N) epilogue shared by the word GEMVs, the word GEMM and the
word grad-input: with a split of 1 a program stores its tile (+ bias) in the
output dtype; otherwise each program stores an fp32 partial sum and the last
program of an output tile to finish adds them all in a fixed order
(deterministic, one launch, no zero fill, no atomics on the output).
The counters it needs live here too, one zeroed buffer per (device, stream)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cast import cast_rtne


@triton.jit
def split_epilogue(acc, rn, out, out_ok, bias_ptr, y_ptr, partial_ptr, count_ptr, pid_n, pid_k,
                   M, N, stride_b, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the GEMV tile ``acc`` (fp32; ``rn``, ``out``, ``out_ok``: its row of
    W, flat y offset and mask, all of acc's shape) as y (+ bias) in y's dtype.
    With SPLIT_K > 1 the program stores its partial sum instead, and the last
    program of the row tile to finish adds all of them in a fixed order."""
    if SPLIT_K > 1:
        tl.store(partial_ptr + pid_k * M * N + out, acc, mask=out_ok)
        tl.debug_barrier()  # every lane's partials stored before the count goes up
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                # .cg: read L2, where the other SMs' partials are, not a stale L1 line.
                acc += tl.load(partial_ptr + split * M * N + out, mask=out_ok, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn * stride_b, mask=out_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + out, cast_rtne(acc, y_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_b, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + out, cast_rtne(acc, y_ptr.dtype.element_ty), mask=out_ok)


# Per (device, stream): the split-K row-tile counters of the GEMVs. Zeroed
# once when made; every launch leaves them at zero again.
_split_counters: dict = {}


def split_counter(device: torch.device, tiles: int) -> torch.Tensor:
    """The counters for a launch of ``tiles`` row tiles on the current stream.
    One made while a CUDA graph is being captured (no counter for that stream
    yet) belongs to the graph: zeroed by a node of the graph, in its memory
    pool, and not kept here, where it would outlive the graph's pool
    (torch.compile's CUDA-graph trees refuse such a tensor)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    count = _split_counters.get(key)
    if count is None or count.numel() < tiles:
        count = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return count
        _split_counters[key] = count
    return count
