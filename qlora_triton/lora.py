"""The LoRA layer on a frozen NF4 weight as ONE ``torch.autograd.Function``.

Forward, for ``x`` of shape ``[..., K]``, a frozen NF4 weight ``W [N, K]``, an
optional bias ``b [N]``, ``A [r, K]``, ``B [N, r]`` and scaling ``s``::

    m   = bernoulli(1 - p) / (1 - p)         # dropout mask (1 everywhere when p == 0)
    x_d = x * m                              # [..., K]
    h   = x_d @ A.T                          # [..., r]  tiny: r << K
    y   = x @ W.T + b + s * h @ B.T          # [..., N]  (one op: folded into the GEMV at M <= 16)

Backward, with ``g = dL/dy`` flattened to ``[M, N]`` (every product below is a
plain matmul; nothing forms the ``[N, K]`` update ``B @ A``, and ``W`` is dense only
in the "dequant" strategy's one reused scratch buffer, never saved)::

    u       = g @ B                          # [M, r], shared by dL/dx and dL/dA
    dL/dx   = g @ W  +  s * (u @ A) * m      # NF4 grad-input op + rank-r path (addmm_ when p == 0)
    dL/dA   = s * u.T @ x_d                  # [r, K]
    dL/dB   = s * g.T @ h                    # [N, r]
    dL/db   = g.sum(0)

``s`` rides in each product's ``alpha`` (:func:`scaled_mm_`; with dropout, in the
mask's scalar), never in a multiply of its own.

Derivation: ``y`` is linear in each of ``x``, ``A``, ``B``, ``b``. For
``y_B = s * h @ B.T``, ``dL/dB = s * g.T @ h``. For ``y_A = s * (x_d @ A.T) @ B.T``,
``dL/d(x_d @ A.T) = s * g @ B = gB`` and so ``dL/dA = gB.T @ x_d`` and
``dL/dx_d = gB @ A``; ``x_d = x * m`` elementwise gives ``dL/dx = (gB @ A) * m``
for that path (``gB = s * u`` above). The base path ``x @ W.T`` gives ``g @ W``. ``W`` is frozen, so
no weight gradient is ever computed.

What is saved for backward, and why:

* ``x`` (not ``x_d``): only when ``A`` needs a gradient. The q/k/v (or gate/up)
  projections of a transformer block read the same ``x``; saving it shares one
  storage between them, where each layer's ``x_d`` would be a fresh copy. With
  dropout the mask is saved as bool (1 byte per element) and ``x_d`` is
  recomputed in backward (one elementwise multiply).
* ``h = x_d @ A.T`` ``[..., r]``: only when ``B`` needs a gradient.
* ``A`` and ``B`` (tiny), and the NF4 weight *by reference* on ``ctx`` (not
  through ``save_for_backward``, so activation-offloading hooks never copy it).

The mask is drawn inside ``forward`` from torch's generator: a seeded run is
reproducible, and ``torch.utils.checkpoint`` (which restores the RNG state)
recomputes the same mask.
"""

from __future__ import annotations

import torch

from .library import weight_args
from .matmul import nf4_matmul_grad_input_args
from .weight import NF4Weight

_lora_matmul_op = torch.ops.qlora_triton.nf4_lora_matmul.default


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    if p <= 0.0:
        return None
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def _dropped(x: torch.Tensor, mask: torch.Tensor | None, p: float, scale: float = 1.0) -> torch.Tensor:
    """``scale * x`` through the dropout mask (``x`` itself without one: then ``scale`` must be 1)."""
    if mask is None:
        return x
    return x * mask * (scale / (1.0 - p))


def scaled_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = scale * a @ b`` in ONE product, written into ``out`` (fresh, or a
    contiguous region of a gradient buffer): ``addmm`` with ``beta = 0``
    ignores ``out``'s old contents, NaN included, and needs no multiply after."""
    return torch.addmm(out, a, b, beta=0, alpha=scale, out=out)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``[M, last]`` view; in-place updates through it reach ``t``."""
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def _lora_forward(x, lora_A, lora_B, bias, wargs, scaling, mask, p):
    """``(y, h)`` of the module docstring; shared by training and inference.
    Beside the base product (and the dropout mask), one launch: ``x_d @ A.T``;
    the update ``s * h @ B.T`` joins the base product in one op
    (``nf4_lora_matmul``): at decode sizes (the GEMV) inside the GEMV's
    epilogue, in fp32, so that a LoRA layer's eval forward at M <= 16 is two
    kernel launches; otherwise as one addmm into the fresh base output."""
    h = torch.nn.functional.linear(_rows(_dropped(x, mask, p)), lora_A)  # [M, r]
    y = _lora_matmul_op(x, *wargs[:6], bias, h, lora_B, float(scaling), *wargs[6:])
    return y, h


class LoRANF4Function(torch.autograd.Function):
    """``y = x @ W.T + b + s * (dropout(x) @ A.T) @ B.T`` with ``W`` in NF4.

    ``apply(x, lora_A, lora_B, bias, wargs, scaling, dropout_p)``: ``wargs`` is
    :func:`qlora_triton.library.weight_args` of the NF4 weight; ``x``,
    ``lora_A``, ``lora_B`` and ``bias`` (or ``None``) must share one float
    dtype; the output has that dtype.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, wargs: tuple, scaling: float, dropout_p: float):
        mask = _dropout_mask(x, dropout_p)
        y, h = _lora_forward(x, lora_A, lora_B, bias, wargs, scaling, mask, dropout_p)
        need_x, need_A, need_B, need_b = ctx.needs_input_grad[:4]
        ctx.wargs, ctx.scaling, ctx.dropout_p = wargs, scaling, dropout_p
        ctx.x_shape = x.shape
        ctx.save_for_backward(
            x if need_A else None,
            mask if (need_A or need_x) else None,
            h if need_B else None,
            lora_A if need_x else None,
            lora_B if (need_x or need_A) else None,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, h, lora_A, lora_B = ctx.saved_tensors
        need_x, need_A, need_B, need_b = ctx.needs_input_grad[:4]
        p, s = ctx.dropout_p, ctx.scaling
        k = ctx.x_shape[-1]
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [M, N]
        grad_x = grad_A = grad_B = grad_b = None

        u = g @ lora_B if (need_x or need_A) else None  # [M, r]
        if need_x:
            # The base product (any strategy) returns a fresh contiguous tensor:
            # the rank-r term goes into it in place.
            grad_x = nf4_matmul_grad_input_args(grad_y, ctx.wargs).contiguous()
            if mask is None:
                _rows(grad_x).addmm_(u, lora_A, alpha=s)  # no [M, K] temporary
            else:  # the mask applies to the rank-r term alone
                _rows(grad_x).add_(_dropped(u @ lora_A, mask.reshape(-1, k), p, s))
        if need_A:
            x_d = _dropped(x, mask, p).reshape(-1, k)
            grad_A = scaled_mm_(u.new_empty((u.shape[1], k)), u.t(), x_d, s)
        if need_B:
            grad_B = scaled_mm_(g.new_empty((g.shape[1], h.shape[1])), g.t(), h, s)
        if need_b:  # False when bias is None
            grad_b = g.sum(0, dtype=torch.float32).to(g.dtype)  # as NF4Matmul: summed in fp32
        return grad_x, grad_A, grad_B, grad_b, None, None, None


def lora_nf4_linear(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Functional form of :class:`LoRANF4Function`.

    When no gradient can flow (``torch.no_grad`` or nothing requires grad) it
    runs the same forward without building an autograd node, so nothing is
    saved. ``dropout_p`` is applied as given: pass 0 in eval mode.
    """
    return lora_nf4_linear_args(x, weight_args(qw), bias, lora_A, lora_B, scaling, dropout_p)


def lora_nf4_linear_args(x: torch.Tensor, wargs: tuple, bias: torch.Tensor | None,
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`lora_nf4_linear` on ``wargs = weight_args(qw)`` (modules keep them)."""
    # Non-contiguous x gives bit-identical results to its contiguous copy (BLAS
    # may round differently on a strided operand); a no-op for the usual case.
    x = x if x.is_contiguous() else x.contiguous()
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    if needs_graph:
        return LoRANF4Function.apply(x, lora_A, lora_B, bias, wargs, scaling, dropout_p)
    mask = _dropout_mask(x, dropout_p)
    return _lora_forward(x, lora_A, lora_B, bias, wargs, scaling, mask, dropout_p)[0]
