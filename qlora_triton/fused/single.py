r"""A lone LoRA projection (a decoder block's ``o_proj``) as ONE ``torch.autograd.Function``
with the fewest ops.

Forward, for ``x [M, K]``, NF4 ``W [N, K]``, adapters ``A [r, K]``, ``B [N, r]``,
scaling ``s`` and bias ``b``::

    a = x @ A.T                          # [M, r]
    y = x @ W.T + b + s * a @ B.T        # qlora_triton::nf4_lora_matmul: the base product
                                         # (the one strategy decision), the update folded in

Backward, with ``G = dL/dy [M, N]``. ``y`` is linear in each of ``x``, ``A``,
``B``, ``b`` (the LoRA layer of :mod:`qlora_triton.lora` without dropout)::

    u     = G @ B                        # [M, r]
    dL/dB = s * G.T @ a                  # one product, the scale in its alpha
    dL/dA = s * u.T @ x                  # likewise
    dL/dx = G @ W + s * u @ A            # NF4 grad-input, then addmm_ into it
    dL/db = G.sum(0)

What it saves over :class:`qlora_triton.lora.LoRANF4Function` fed by the
layer's own casts: the two adapters are cast to the compute dtype with one
concatenation and one cast (as many launches as the layer's two casts), but
their gradients are written into one buffer of that layout and cast back to
the parameters' dtype ONCE, where autograd casts each back through its own
cast's backward (two). ``s`` rides in the products' ``alpha`` in both (the
layer's backward multiplied by it afterwards, two ``mul_``, until 2026-12-05).
Seven launches in backward against eight, six in forward as before, at the
"dequant" strategy.

Saved: ``x`` (which the layer saves too), ``a`` (``[M, r]``: tiny) and the
packed adapters. Dropout is not supported (:func:`qlora_triton.fuse` leaves a
projection with ``lora_dropout > 0`` unfused).
"""

from __future__ import annotations

import dataclasses

import torch

from ..lora import scaled_mm_
from ..matmul import nf4_matmul_grad_input_args
from .projection import Projection, adapter_dtype, bias_grad, pack_adapters, unpack

_lora_matmul_op = torch.ops.qlora_triton.nf4_lora_matmul.default


@dataclasses.dataclass(frozen=True)
class SingleSpec:
    """The non-tensor inputs of :class:`LoRASingleFunction`."""

    wargs: tuple        # qlora_triton.library.weight_args of the NF4 weight
    scaling: float
    dtype: torch.dtype  # the compute dtype


def _forward(x2, A, B, b, spec: SingleSpec):
    """``(y, a, flat)`` of the module docstring (``flat``: the packed adapters)."""
    flat = pack_adapters((A, B), spec.dtype)
    A, B = unpack(flat, (tuple(A.shape), tuple(B.shape)))
    a = torch.mm(x2, A.t())
    w = spec.wargs
    y = _lora_matmul_op(x2, *w[:6], b, a, B, float(spec.scaling), *w[6:])
    return y, a, flat


class LoRASingleFunction(torch.autograd.Function):
    """``x @ W.T + b + s * (x @ A.T) @ B.T`` of one NF4 + LoRA projection
    (module docstring). ``apply(x2, A, B, b, spec)`` with ``x2 [M, K]`` in the
    compute dtype and the adapters as they are stored (cast here, at once)."""

    @staticmethod
    def forward(ctx, x2, A, B, b, spec: SingleSpec):
        y, a, flat = _forward(x2, A, B, b, spec)
        ctx.spec = spec
        ctx.bias = b
        ctx.param_dtype = adapter_dtype((A, B)) or spec.dtype
        ctx.shapes = (tuple(A.shape), tuple(B.shape))
        ctx.save_for_backward(x2, a, flat)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, a, flat = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec, s = ctx.spec, ctx.spec.scaling
        A, B = unpack(flat, ctx.shapes)
        M = x2.shape[0]
        G = grad_y.reshape(M, -1)
        G = G if G.is_contiguous() else G.contiguous()
        grad_flat = torch.empty_like(flat)  # the adapters' gradients, packed as the adapters
        gA, gB = unpack(grad_flat, ctx.shapes)
        u = torch.mm(G, B) if (need[0] or need[1]) else None
        if need[2]:
            scaled_mm_(gB, G.t(), a, s)
        if need[1]:
            scaled_mm_(gA, u.t(), x2, s)
        grad_x = None
        if need[0]:
            grad_x = nf4_matmul_grad_input_args(G, spec.wargs).contiguous()
            grad_x.addmm_(u, A, alpha=s)
        if (need[1] or need[2]) and grad_flat.dtype != ctx.param_dtype:
            grad_flat = grad_flat.to(ctx.param_dtype)  # one cast for both
        gA, gB = unpack(grad_flat, ctx.shapes)
        return (grad_x, gA if need[1] else None, gB if need[2] else None, bias_grad(G, ctx.bias, need[3]),
                None)


def lora_single(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """The fused projection on ``x [..., K]`` in the compute dtype (with a
    gradient to flow; :class:`qlora_triton.fused.modules.FusedSingleLoRALinear4bit`
    runs the layer's own forward otherwise); returns ``[..., N]``."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    spec = SingleSpec(p.wargs, p.scaling, x.dtype)
    y = LoRASingleFunction.apply(x2, p.lora_A, p.lora_B, p.bias, spec)
    return y.reshape(*x.shape[:-1], y.shape[-1])
