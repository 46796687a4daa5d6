r"""The gated LoRA MLP of a decoder block as ONE ``torch.autograd.Function``.

Forward, for ``x [M, K]`` (leading dims flattened), NF4 weights ``W_g, W_u
[I, K]`` and ``W_d [K', I]``, adapters ``A_p [r_p, in]``, ``B_p [out, r_p]``
and scalings ``s_p`` (p = g, u, d), biases ``b_p`` (or none)::

    a     = x @ [A_g; A_u].T                          # [M, r_g + r_u]  x read once for both adapters
    gu    = x @ [W_g; W_u].T + [b_g, b_u]             # [M, 2I]  one product (nf4_matmul_cat)
    gu[:, :I] += s_g * a_g @ B_g.T                    # gate  (addmm_ in place)
    gu[:, I:] += s_u * a_u @ B_u.T                    # up
    h     = act(gate) * up                            # [M, I]  one Triton kernel
    d     = h @ A_d.T                                 # [M, r_d]
    y     = h @ W_d.T + b_d + s_d * d @ B_d.T         # [M, K']

Backward, with ``G = dL/dy [M, K']``. Every map above is linear in each of its
inputs except the activation, so each adapter gradient is the usual
``dL/dB = s * g.T @ (input @ A.T)`` and ``dL/dA = s * (g @ B).T @ input`` of a
LoRA layer (:mod:`qlora_triton.lora`), with the gradient ``g`` of its output::

    t       = G @ B_d                                 # [M, r_d]
    dL/dB_d = s_d * G.T @ d
    dh      = G @ W_d + s_d * t @ A_d                 # NF4 grad-input, then addmm_
    # h = act(gate) * up, so dL/dgate = dh * up * act'(gate), dL/dup = dh * act(gate);
    # the same kernel recomputes h (not saved) into dh's storage and writes the
    # two gradients over gu (saved for exactly this): no allocation.
    dL/dA_d = s_d * t.T @ h
    u       = [dgate @ B_g, dup @ B_u]                # [M, r_g + r_u]
    dL/dB_g = s_g * dgate.T @ a_g;   dL/dB_u = s_u * dup.T @ a_u
    dL/dA_g = s_g * u_g.T @ x;       dL/dA_u = s_u * u_u.T @ x
    dL/dx   = [dgate, dup] @ [W_g; W_u]               # one product (nf4_matmul_grad_input_cat)
              + s_g * u_g @ A_g + s_u * u_u @ A_u     # addmm_ (one when s_g == s_u)
    dL/db_p = column sums of the output gradients

Saved: ``x``, ``gu`` ([M, 2I]: gate and up, which the activation's backward
needs), ``a`` and ``d`` ([M, r]: tiny), the adapters. Not saved: ``h`` (one
fused elementwise pass recomputes it for free inside the activation's
backward) nor anything dense of the NF4 weights. The unfused layers save, per
row, ``x`` plus gate, act(gate), up and h: ``K + 4I`` values against ``K + 2I``
here (saving ``h`` instead of recomputing it would cost ``I`` more per row).

Dropout on the adapters' input is not supported: :func:`qlora_triton.fuse`
refuses layers with ``lora_dropout > 0`` (each projection would need its own
mask and so its own ``x @ A.T``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..matmul import nf4_matmul_args, nf4_matmul_grad_input_args
from .ops import cat_args, gated_act, gated_act_backward_, nf4_matmul_cat, nf4_matmul_grad_input_cat
from .projection import Projection, bias_grad, scaled_mm


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """The non-tensor inputs of :class:`LoRAMLPFunction`."""

    wargs: tuple      # (gate, up, down) weight_args
    scalings: tuple   # (s_g, s_u, s_d)
    act: int          # qlora_triton.fused.ops.SILU or GELU_TANH


def _gate_up(x2, A_gu, B_g, B_u, b_g, b_u, spec: MLPSpec):
    """``(gu, a)`` of the module docstring."""
    w_g, w_u, _ = spec.wargs
    s_g, s_u, _ = spec.scalings
    r_g, I = B_g.shape[1], w_g[6]
    a = torch.mm(x2, A_gu.t())
    packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args((w_g, w_u))
    gu = nf4_matmul_cat(x2, packed, absmax, code, absmax2, code2, offset, [b_g, b_u], n, k, bs, bs2)
    if r_g:
        gu[:, :I].addmm_(a[:, :r_g], B_g.t(), alpha=s_g)
    if B_u.shape[1]:
        gu[:, I:].addmm_(a[:, r_g:], B_u.t(), alpha=s_u)
    return gu, a


def _down(h, A_d, B_d, b_d, spec: MLPSpec):
    d = torch.mm(h, A_d.t())
    y = nf4_matmul_args(h, spec.wargs[2], b_d)  # fresh, contiguous
    if B_d.shape[1]:
        y.addmm_(d, B_d.t(), alpha=spec.scalings[2])
    return y, d


def _forward(x2, A_gu, B_g, B_u, A_d, B_d, b_g, b_u, b_d, spec: MLPSpec):
    gu, a = _gate_up(x2, A_gu, B_g, B_u, b_g, b_u, spec)
    h = gated_act(gu, spec.act)
    y, d = _down(h, A_d, B_d, b_d, spec)
    return y, gu, a, d


class LoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` of three NF4 + LoRA projections (module
    docstring). ``apply(x2, A_gu, B_g, B_u, A_d, B_d, b_g, b_u, b_d, spec)``
    with ``x2 [M, K]`` and ``A_gu = cat(A_g, A_u)``; all in one dtype."""

    @staticmethod
    def forward(ctx, x2, A_gu, B_g, B_u, A_d, B_d, b_g, b_u, b_d, spec: MLPSpec):
        y, gu, a, d = _forward(x2, A_gu, B_g, B_u, A_d, B_d, b_g, b_u, b_d, spec)
        ctx.spec = spec
        ctx.biases = (b_g, b_u, b_d)
        ctx.save_for_backward(x2, gu, a, d, A_gu, B_g, B_u, A_d, B_d)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, gu, a, d, A_gu, B_g, B_u, A_d, B_d = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec = ctx.spec
        s_g, s_u, s_d = spec.scalings
        w_g, w_u, w_d = spec.wargs
        I, r_g = w_g[6], B_g.shape[1]
        G = grad_y.contiguous()

        # down
        t = torch.mm(G, B_d)
        grad_B_d = scaled_mm(B_d, G.t(), d, s_d) if need[5] else None
        dh = nf4_matmul_grad_input_args(G, w_d).contiguous()
        if B_d.shape[1]:
            dh.addmm_(t, A_d, alpha=s_d)
        gated_act_backward_(dh, gu, spec.act)  # dh := h, gu := [dgate | dup]
        h, dgate, dup = dh, gu[:, :I], gu[:, I:]
        grad_A_d = scaled_mm(A_d, t.t(), h, s_d) if need[4] else None
        grad_b_d = bias_grad(G, ctx.biases[2], need[8])

        # gate and up
        u = torch.cat((torch.mm(dgate, B_g), torch.mm(dup, B_u)), dim=1)
        grad_B_g = scaled_mm(B_g, dgate.t(), a[:, :r_g], s_g) if need[2] else None
        grad_B_u = scaled_mm(B_u, dup.t(), a[:, r_g:], s_u) if need[3] else None
        grad_A_gu = None
        if need[1]:
            if s_g == s_u:
                grad_A_gu = scaled_mm(A_gu, u.t(), x2, s_g)
            else:
                grad_A_gu = torch.cat((scaled_mm(A_gu[:r_g], u[:, :r_g].t(), x2, s_g),
                                       scaled_mm(A_gu[r_g:], u[:, r_g:].t(), x2, s_u)))
        grad_x = None
        if need[0]:
            packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args((w_g, w_u))
            grad_x = nf4_matmul_grad_input_cat(gu, packed, absmax, code, absmax2, code2, offset, n, k,
                                               bs, bs2).contiguous()
            if s_g == s_u:
                grad_x.addmm_(u, A_gu, alpha=s_g)
            else:
                grad_x.addmm_(u[:, :r_g], A_gu[:r_g], alpha=s_g)
                grad_x.addmm_(u[:, r_g:], A_gu[r_g:], alpha=s_u)
        grad_b_g = bias_grad(dgate, ctx.biases[0], need[6])
        grad_b_u = bias_grad(dup, ctx.biases[1], need[7])
        return (grad_x, grad_A_gu, grad_B_g, grad_B_u, grad_A_d, grad_B_d, grad_b_g, grad_b_u, grad_b_d,
                None)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, act: int) -> torch.Tensor:
    """The fused MLP on ``x [..., K]`` (every tensor in one dtype); returns
    ``[..., K']``. Without a gradient to flow it runs the same forward and
    saves nothing."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    spec = MLPSpec((gate.wargs, up.wargs, down.wargs), (gate.scaling, up.scaling, down.scaling), act)
    A_gu = torch.cat((gate.lora_A, up.lora_A))
    tensors = (x2, A_gu, gate.lora_B, up.lora_B, down.lora_A, down.lora_B, gate.bias, up.bias, down.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = LoRAMLPFunction.apply(*tensors, spec)
    else:
        y = _forward(*tensors, spec)[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])
