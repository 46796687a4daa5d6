r"""The q, k and v projections of an attention block as ONE ``torch.autograd.Function``.

Forward, for ``x [M, K]`` and projections p = q, k, v (NF4 ``W_p [N_p, K]``,
adapters ``A_p [r_p, K]``, ``B_p [N_p, r_p]``, scalings ``s_p``, biases ``b_p``)::

    a   = x @ [A_q; A_k; A_v].T                     # [M, r_q + r_k + r_v]: x read once
    qkv = x @ [W_q; W_k; W_v].T + [b_q, b_k, b_v]   # [M, N_q + N_k + N_v]: one product
    qkv[:, p] += s_p * a_p @ B_p.T                  # three addmm_ into column slices
    q, k, v = the column slices of qkv              # views: no copy

Backward, with ``g_p = dL/dp`` and ``u_p = g_p @ B_p`` ([M, r_p]); each output
is a LoRA layer's, so its gradients are a LoRA layer's (:mod:`qlora_triton.lora`)
and those of ``x`` add up over the three::

    dL/dB_p = s_p * g_p.T @ a_p
    dL/dA_p = s_p * u_p.T @ x                       # one product for all three when the s_p agree
    dL/dx   = [g_q, g_k, g_v] @ [W_q; W_k; W_v]     # one product (nf4_matmul_grad_input_cat)
              + sum_p s_p * u_p @ A_p               # one addmm_ when the s_p agree
    dL/db_p = g_p.sum(0)

Saved: ``x`` (which every unfused projection saved too, as one shared
storage), ``a`` ([M, r]: tiny) and the adapters; nothing of the outputs.
Dropout on the adapters' input is not supported (:func:`qlora_triton.fuse`
refuses it): the three projections would each need their own mask.
"""

from __future__ import annotations

import dataclasses

import torch

from .ops import cat_args, nf4_matmul_cat, nf4_matmul_grad_input_cat
from .projection import Projection, bias_grad, scaled_mm


@dataclasses.dataclass(frozen=True)
class QKVSpec:
    """The non-tensor inputs of :class:`LoRAQKVFunction`."""

    wargs: tuple      # (q, k, v) weight_args
    scalings: tuple   # (s_q, s_k, s_v)


def _bounds(sizes) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _forward(x2, A, B_q, B_k, B_v, b_q, b_k, b_v, spec: QKVSpec):
    a = torch.mm(x2, A.t())
    packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args(spec.wargs)
    qkv = nf4_matmul_cat(x2, packed, absmax, code, absmax2, code2, offset, [b_q, b_k, b_v], n, k, bs, bs2)
    ranks = _bounds(B.shape[1] for B in (B_q, B_k, B_v))
    cols = _bounds(n)
    for B, s, (r0, r1), (c0, c1) in zip((B_q, B_k, B_v), spec.scalings, ranks, cols):
        if r1 > r0:
            qkv[:, c0:c1].addmm_(a[:, r0:r1], B.t(), alpha=s)
    return tuple(qkv[:, c0:c1] for c0, c1 in cols), a


class LoRAQKVFunction(torch.autograd.Function):
    """q, k, v of three NF4 + LoRA projections of one input (module docstring).
    ``apply(x2, A, B_q, B_k, B_v, b_q, b_k, b_v, spec)`` with ``x2 [M, K]`` and
    ``A = cat(A_q, A_k, A_v)``; returns three ``[M, N_p]`` views of one tensor."""

    @staticmethod
    def forward(ctx, x2, A, B_q, B_k, B_v, b_q, b_k, b_v, spec: QKVSpec):
        (q, k, v), a = _forward(x2, A, B_q, B_k, B_v, b_q, b_k, b_v, spec)
        ctx.spec = spec
        ctx.biases = (b_q, b_k, b_v)
        ctx.save_for_backward(x2, a, A, B_q, B_k, B_v)
        return q, k, v

    @staticmethod
    def backward(ctx, g_q, g_k, g_v):
        x2, a, A, B_q, B_k, B_v = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec = ctx.spec
        Bs = (B_q, B_k, B_v)
        n = [w[6] for w in spec.wargs]
        grads = [torch.zeros((x2.shape[0], ni), dtype=x2.dtype, device=x2.device) if g is None else g
                 for g, ni in zip((g_q, g_k, g_v), n)]
        G = torch.cat(grads, dim=1)  # [M, N_q + N_k + N_v]: the one grad-input product reads it
        cols, ranks = _bounds(n), _bounds(B.shape[1] for B in Bs)
        g_cols = [G[:, c0:c1] for c0, c1 in cols]
        u = torch.cat([torch.mm(g, B) for g, B in zip(g_cols, Bs)], dim=1)  # [M, r_q + r_k + r_v]
        one_scale = len(set(spec.scalings)) == 1
        grad_Bs = [scaled_mm(B, g.t(), a[:, r0:r1], s) if need[2 + i] else None
                   for i, (B, g, s, (r0, r1)) in enumerate(zip(Bs, g_cols, spec.scalings, ranks))]
        grad_A = None
        if need[1]:
            if one_scale:
                grad_A = scaled_mm(A, u.t(), x2, spec.scalings[0])
            else:
                grad_A = torch.cat([scaled_mm(A[r0:r1], u[:, r0:r1].t(), x2, s)
                                    for s, (r0, r1) in zip(spec.scalings, ranks)])
        grad_x = None
        if need[0]:
            packed, absmax, code, absmax2, code2, offset, n_, k, bs, bs2 = cat_args(spec.wargs)
            grad_x = nf4_matmul_grad_input_cat(G, packed, absmax, code, absmax2, code2, offset, n_, k,
                                               bs, bs2).contiguous()
            if one_scale:
                grad_x.addmm_(u, A, alpha=spec.scalings[0])
            else:
                for s, (r0, r1) in zip(spec.scalings, ranks):
                    if r1 > r0:
                        grad_x.addmm_(u[:, r0:r1], A[r0:r1], alpha=s)
        grad_bs = [bias_grad(g, b, need[5 + i]) for i, (g, b) in enumerate(zip(g_cols, ctx.biases))]
        return (grad_x, grad_A, *grad_Bs, *grad_bs, None)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection) -> tuple[torch.Tensor, ...]:
    """The fused q, k, v on ``x [..., K]`` (every tensor in one dtype): three
    ``[..., N_p]`` tensors. Without a gradient to flow it runs the same
    forward and saves nothing."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    spec = QKVSpec((q.wargs, k.wargs, v.wargs), (q.scaling, k.scaling, v.scaling))
    A = torch.cat((q.lora_A, k.lora_A, v.lora_A))
    tensors = (x2, A, q.lora_B, k.lora_B, v.lora_B, q.bias, k.bias, v.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        outs = LoRAQKVFunction.apply(*tensors, spec)
    else:
        outs = _forward(*tensors, spec)[0]
    lead = x.shape[:-1]
    return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)
