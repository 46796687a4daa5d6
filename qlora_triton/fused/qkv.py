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
The six adapter matrices are cast to the compute dtype together (one
concatenation, one cast) and their gradients are written into one buffer of
the same layout, cast back at once: the unfused layers cast each matrix, both
ways. ``u`` is built transposed, ``[r, M]``, so that each ``u_p`` is a
contiguous block that its product writes in place.
Dropout on the adapters' input is not supported (:func:`qlora_triton.fuse`
refuses it): the three projections would each need their own mask.
"""

from __future__ import annotations

import dataclasses

import torch

from ..lora import scaled_mm_
from .ops import cat_args, nf4_matmul_cat, nf4_matmul_grad_input_cat
from .projection import Projection, adapter_dtype, bias_grad, pack_adapters, unpack


@dataclasses.dataclass(frozen=True)
class QKVSpec:
    """The non-tensor inputs of :class:`LoRAQKVFunction`."""

    wargs: tuple      # (q, k, v) weight_args
    scalings: tuple   # (s_q, s_k, s_v)
    dtype: torch.dtype  # the compute dtype


def _bounds(sizes) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _shapes(Bs, K: int) -> list[tuple[int, int]]:
    """The packed adapters' layout: ``[A_q; A_k; A_v]`` stacked, then each ``B``."""
    return [(sum(B.shape[1] for B in Bs), K)] + [tuple(B.shape) for B in Bs]


def _forward(x2, A_q, B_q, A_k, B_k, A_v, B_v, b_q, b_k, b_v, spec: QKVSpec):
    Bs = (B_q, B_k, B_v)
    flat = pack_adapters((A_q, A_k, A_v) + Bs, spec.dtype)
    A, *Bc = unpack(flat, _shapes(Bs, x2.shape[1]))
    a = torch.mm(x2, A.t())
    packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args(spec.wargs)
    qkv = nf4_matmul_cat(x2, packed, absmax, code, absmax2, code2, offset, [b_q, b_k, b_v], n, k, bs, bs2)
    cols = _bounds(n)
    for B, s, (r0, r1), (c0, c1) in zip(Bc, spec.scalings, _bounds(B.shape[1] for B in Bs), cols):
        if r1 > r0:
            qkv[:, c0:c1].addmm_(a[:, r0:r1], B.t(), alpha=s)
    return tuple(qkv[:, c0:c1] for c0, c1 in cols), a, flat


class LoRAQKVFunction(torch.autograd.Function):
    """q, k, v of three NF4 + LoRA projections of one input (module docstring).
    ``apply(x2, A_q, B_q, A_k, B_k, A_v, B_v, b_q, b_k, b_v, spec)`` with ``x2
    [M, K]`` in the compute dtype and the adapters as they are stored (cast
    here, all at once); returns three ``[M, N_p]`` views of one tensor."""

    @staticmethod
    def forward(ctx, x2, A_q, B_q, A_k, B_k, A_v, B_v, b_q, b_k, b_v, spec: QKVSpec):
        (q, k, v), a, flat = _forward(x2, A_q, B_q, A_k, B_k, A_v, B_v, b_q, b_k, b_v, spec)
        ctx.spec = spec
        ctx.biases = (b_q, b_k, b_v)
        ctx.param_dtype = adapter_dtype((A_q, A_k, A_v, B_q, B_k, B_v)) or spec.dtype
        ctx.B_shapes = (B_q.shape, B_k.shape, B_v.shape)
        ctx.save_for_backward(x2, a, flat)
        return q, k, v

    @staticmethod
    def backward(ctx, g_q, g_k, g_v):
        x2, a, flat = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec = ctx.spec
        M, K = x2.shape
        n = [w[6] for w in spec.wargs]
        ranks = _bounds(shape[1] for shape in ctx.B_shapes)
        shapes = [(ranks[-1][1], K)] + [tuple(shape) for shape in ctx.B_shapes]
        A, *Bs = unpack(flat, shapes)
        grads = [torch.zeros((M, ni), dtype=x2.dtype, device=x2.device) if g is None else g.reshape(M, ni)
                 for g, ni in zip((g_q, g_k, g_v), n)]
        G = torch.cat(grads, dim=1)  # [M, N_q + N_k + N_v]: the one grad-input product reads it
        g_cols = [G[:, c0:c1] for c0, c1 in _bounds(n)]
        uT = x2.new_empty((ranks[-1][1], M))  # rows r_p: u_p.T = B_p.T @ g_p.T
        for B, g, (r0, r1) in zip(Bs, g_cols, ranks):
            if r1 > r0:
                torch.mm(B.t(), g.t(), out=uT[r0:r1])
        one_scale = len(set(spec.scalings)) == 1
        grad_flat = torch.empty_like(flat)  # the adapters' gradients, packed as the adapters
        gA, *gBs = unpack(grad_flat, shapes)
        for i, (gB, g, s, (r0, r1)) in enumerate(zip(gBs, g_cols, spec.scalings, ranks)):
            if need[2 + 2 * i] and r1 > r0:
                scaled_mm_(gB, g.t(), a[:, r0:r1], s)
        if any(need[1:7:2]):
            if one_scale:
                scaled_mm_(gA, uT, x2, spec.scalings[0])
            else:
                for s, (r0, r1) in zip(spec.scalings, ranks):
                    if r1 > r0:
                        scaled_mm_(gA[r0:r1], uT[r0:r1], x2, s)
        grad_x = None
        if need[0]:
            packed, absmax, code, absmax2, code2, offset, n_, k, bs, bs2 = cat_args(spec.wargs)
            grad_x = nf4_matmul_grad_input_cat(G, packed, absmax, code, absmax2, code2, offset, n_, k,
                                               bs, bs2).contiguous()
            if one_scale:
                grad_x.addmm_(uT.t(), A, alpha=spec.scalings[0])
            else:
                for s, (r0, r1) in zip(spec.scalings, ranks):
                    if r1 > r0:
                        grad_x.addmm_(uT[r0:r1].t(), A[r0:r1], alpha=s)
        if grad_flat.dtype != ctx.param_dtype:
            grad_flat = grad_flat.to(ctx.param_dtype)  # one cast for all six
        gA, *gBs = unpack(grad_flat, shapes)
        adapter_grads = []
        for i, (gB, (r0, r1)) in enumerate(zip(gBs, ranks)):
            adapter_grads += [gA[r0:r1] if need[1 + 2 * i] else None, gB if need[2 + 2 * i] else None]
        grad_bs = [bias_grad(g, b, need[7 + i]) for i, (g, b) in enumerate(zip(g_cols, ctx.biases))]
        return (grad_x, *adapter_grads, *grad_bs, None)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection) -> tuple[torch.Tensor, ...]:
    """The fused q, k, v on ``x [..., K]`` in the compute dtype: three
    ``[..., N_p]`` tensors. Without a gradient to flow it runs the same
    forward and saves nothing."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    spec = QKVSpec((q.wargs, k.wargs, v.wargs), (q.scaling, k.scaling, v.scaling), x.dtype)
    tensors = (x2, q.lora_A, q.lora_B, k.lora_A, k.lora_B, v.lora_A, v.lora_B, q.bias, k.bias, v.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        outs = LoRAQKVFunction.apply(*tensors, spec)
    else:
        outs = _forward(*tensors, spec)[0]
    lead = x.shape[:-1]
    return tuple(o.reshape(*lead, o.shape[-1]) for o in outs)
