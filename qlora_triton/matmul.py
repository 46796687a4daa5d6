"""``nf4_matmul``: ``x @ W.T (+ bias)`` through a frozen NF4 weight.

Interface placeholder on the plain-torch reference; the fused Triton kernels
(forward GEMM/GEMV and the input-gradient kernel) replace its internals.
"""

from __future__ import annotations

import torch

from . import reference
from .weight import NF4Weight


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, qw):
        ctx.qw = qw
        ctx.has_bias = bias is not None
        return reference.nf4_matmul(x, qw, bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = nf4_matmul_grad_input(grad_y, ctx.qw) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_b, None


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` of shape ``[..., K]``; returns ``[..., N]``."""
    return _NF4Matmul.apply(x, bias, qw)


def nf4_matmul_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W`` for ``grad_y`` of shape ``[..., N]``; returns ``[..., K]``."""
    return reference.nf4_matmul_grad_input(grad_y, qw)
