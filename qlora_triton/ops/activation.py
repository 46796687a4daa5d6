"""The gated activation of a LoRA MLP block, ``h = act(gate) * up``, and its
backward, each in ONE elementwise kernel.

``gu`` is the ``[M, 2I]`` output of the block's gate-and-up product: columns
``[0, I)`` are ``gate``, ``[I, 2I)`` are ``up`` (rows may be strided; each row's
columns are contiguous). ``act`` is SiLU (``ACT = 0``, Llama, Mistral, Qwen) or
GELU with the tanh approximation (``ACT = 1``, Gemma). Math in fp32, outputs
rounded to nearest even in the tensors' dtype (as torch rounds).

Backward, for ``dh = dL/dh``::

    dL/dgate = dh * up * act'(gate)
    dL/dup   = dh * act(gate)
    h        = act(gate) * up           # recomputed: the down projection's LoRA needs it

It overwrites its inputs: ``h`` goes into ``dh``'s storage and the two
gradients into ``gu``'s (each element is read before it is written, by the same
program), so the backward allocates nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import INTERPRET
from .cast import cast_rtne

SILU, GELU_TANH = 0, 1  # the values of qlora_triton.fused.ops.SILU, GELU_TANH

# Columns per program: the interpreter runs programs one at a time in Python,
# so it takes wider rows.
_BLOCK = 4096 if INTERPRET else 1024


@triton.jit
def _act_and_slope(g, ACT: tl.constexpr):
    """``(act(g), act'(g))`` in fp32."""
    if ACT == 0:  # SiLU: g * sigmoid(g)
        sig = tl.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    else:  # GELU, tanh approximation; tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dz


@triton.jit
def _gated_act_kernel(
    gu_ptr,            # [M, 2I] gate | up, x's dtype
    h_ptr,             # [M, I] output, same dtype
    I,                 # columns of gate (and of up, and of h)
    stride_gu, stride_h,  # row strides
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_slope(gate, ACT)
    tl.store(h_ptr + row * stride_h + cols, cast_rtne(a * up, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_backward_kernel(
    dh_ptr,            # [M, I] dL/dh in; h out (in place)
    gu_ptr,            # [M, 2I] gate | up in; dL/dgate | dL/dup out (in place)
    I,
    stride_dh, stride_gu,  # row strides
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dh_at = dh_ptr + row * stride_dh + cols
    gate_at = gu_ptr + row * stride_gu + cols
    dh = tl.load(dh_at, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_at + I, mask=mask, other=0.0).to(tl.float32)
    a, slope = _act_and_slope(gate, ACT)
    ty = dh_ptr.dtype.element_ty
    tl.store(dh_at, cast_rtne(a * up, ty), mask=mask)
    tl.store(gate_at, cast_rtne(dh * up * slope, ty), mask=mask)
    tl.store(gate_at + I, cast_rtne(dh * a, ty), mask=mask)


def _check(gu: torch.Tensor, act: int) -> int:
    if act not in (SILU, GELU_TANH):
        raise ValueError(f"act must be {SILU} (SiLU) or {GELU_TANH} (GELU tanh), got {act!r}")
    if gu.dim() != 2 or gu.shape[1] % 2 or gu.stride(1) != 1:
        raise ValueError(f"gu must be [M, 2I] with contiguous rows, got shape {tuple(gu.shape)} "
                         f"strides {gu.stride()}")
    return gu.shape[1] // 2


def gated_act(gu: torch.Tensor, act: int) -> torch.Tensor:
    """``act(gu[:, :I]) * gu[:, I:]``: a new contiguous ``[M, I]`` tensor."""
    I = _check(gu, act)
    M = gu.shape[0]
    h = torch.empty((M, I), dtype=gu.dtype, device=gu.device)
    if M and I:
        grid = (M, triton.cdiv(I, _BLOCK))
        _gated_act_kernel[grid](gu, h, I, gu.stride(0), h.stride(0), ACT=act, BLOCK=_BLOCK)
    return h


def gated_act_backward_(dh: torch.Tensor, gu: torch.Tensor, act: int) -> None:
    """In place: ``dh`` becomes ``h``, ``gu`` becomes ``[dL/dgate | dL/dup]``
    (see the module docstring)."""
    I = _check(gu, act)
    M = gu.shape[0]
    if dh.shape != (M, I) or dh.stride(1) != 1 or dh.dtype != gu.dtype:
        raise ValueError(f"dh must be [{M}, {I}] in {gu.dtype} with contiguous rows, got "
                         f"{tuple(dh.shape)} {dh.dtype} strides {dh.stride()}")
    if M and I:
        grid = (M, triton.cdiv(I, _BLOCK))
        _gated_act_backward_kernel[grid](dh, gu, I, dh.stride(0), gu.stride(0), ACT=act, BLOCK=_BLOCK)
