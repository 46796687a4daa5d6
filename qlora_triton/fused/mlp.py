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
needs), ``a`` and ``d`` ([M, r]: tiny), the adapters (packed: the six
matrices are cast to the compute dtype with one concatenation and one cast,
and their gradients written into one buffer of that layout and cast back at
once, where the unfused layers cast each matrix both ways). ``u`` is built
transposed, ``[r, M]``, so each half is a contiguous block written in place. Not saved: ``h`` (one
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

from ..lora import scaled_mm_
from ..matmul import nf4_matmul_args, nf4_matmul_grad_input_args
from .ops import cat_args, gated_act, gated_act_backward_, nf4_matmul_cat, nf4_matmul_grad_input_cat
from .projection import Projection, adapter_dtype, bias_grad, pack_adapters, unpack


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """The non-tensor inputs of :class:`LoRAMLPFunction`."""

    wargs: tuple        # (gate, up, down) weight_args
    scalings: tuple     # (s_g, s_u, s_d)
    act: int            # qlora_triton.fused.ops.SILU or GELU_TANH
    dtype: torch.dtype  # the compute dtype


def _shapes(B_g, B_u, A_d, B_d, K: int) -> list[tuple[int, int]]:
    """The packed adapters' layout: ``[A_g; A_u]`` stacked, ``A_d``, then the ``B``s."""
    return [(B_g.shape[1] + B_u.shape[1], K), tuple(A_d.shape), tuple(B_g.shape), tuple(B_u.shape),
            tuple(B_d.shape)]


def _forward(x2, A_g, B_g, A_u, B_u, A_d, B_d, b_g, b_u, b_d, spec: MLPSpec):
    """``(y, gu, a, d, flat)`` of the module docstring (``flat``: the packed adapters)."""
    w_g, w_u, w_d = spec.wargs
    s_g, s_u, s_d = spec.scalings
    r_g, I = B_g.shape[1], w_g[6]
    flat = pack_adapters((A_g, A_u, A_d, B_g, B_u, B_d), spec.dtype)
    A_gu, A_d, B_g, B_u, B_d = unpack(flat, _shapes(B_g, B_u, A_d, B_d, x2.shape[1]))
    a = torch.mm(x2, A_gu.t())
    packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args((w_g, w_u))
    gu = nf4_matmul_cat(x2, packed, absmax, code, absmax2, code2, offset, [b_g, b_u], n, k, bs, bs2)
    if r_g:
        gu[:, :I].addmm_(a[:, :r_g], B_g.t(), alpha=s_g)
    if B_u.shape[1]:
        gu[:, I:].addmm_(a[:, r_g:], B_u.t(), alpha=s_u)
    h = gated_act(gu, spec.act)
    d = torch.mm(h, A_d.t())
    y = nf4_matmul_args(h, w_d, b_d)  # fresh, contiguous
    if B_d.shape[1]:
        y.addmm_(d, B_d.t(), alpha=s_d)
    return y, gu, a, d, flat


class LoRAMLPFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` of three NF4 + LoRA projections (module
    docstring). ``apply(x2, A_g, B_g, A_u, B_u, A_d, B_d, b_g, b_u, b_d, spec)``
    with ``x2 [M, K]`` in the compute dtype and the adapters as they are
    stored (cast here, all at once)."""

    @staticmethod
    def forward(ctx, x2, A_g, B_g, A_u, B_u, A_d, B_d, b_g, b_u, b_d, spec: MLPSpec):
        y, gu, a, d, flat = _forward(x2, A_g, B_g, A_u, B_u, A_d, B_d, b_g, b_u, b_d, spec)
        ctx.spec = spec
        ctx.biases = (b_g, b_u, b_d)
        ctx.param_dtype = adapter_dtype((A_g, B_g, A_u, B_u, A_d, B_d)) or spec.dtype
        ctx.shapes = _shapes(B_g, B_u, A_d, B_d, x2.shape[1])
        ctx.save_for_backward(x2, gu, a, d, flat)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, gu, a, d, flat = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec = ctx.spec
        s_g, s_u, s_d = spec.scalings
        w_g, w_u, w_d = spec.wargs
        A_gu, A_d, B_g, B_u, B_d = unpack(flat, ctx.shapes)
        I, r_g, r_u, r_d = w_g[6], B_g.shape[1], B_u.shape[1], B_d.shape[1]
        M = x2.shape[0]
        G = grad_y.reshape(M, -1)
        G = G if G.is_contiguous() else G.contiguous()
        grad_flat = torch.empty_like(flat)  # the adapters' gradients, packed as the adapters
        gA_gu, gA_d, gB_g, gB_u, gB_d = unpack(grad_flat, ctx.shapes)

        # down: t = G @ B_d
        t = torch.mm(G, B_d)
        if need[6] and r_d:
            scaled_mm_(gB_d, G.t(), d, s_d)
        dh = nf4_matmul_grad_input_args(G, w_d).contiguous()
        if r_d:
            dh.addmm_(t, A_d, alpha=s_d)
        gated_act_backward_(dh, gu, spec.act)  # dh := h, gu := [dgate | dup]
        h, dgate, dup = dh, gu[:, :I], gu[:, I:]
        if need[5] and r_d:
            scaled_mm_(gA_d, t.t(), h, s_d)
        grad_b_d = bias_grad(G, ctx.biases[2], need[9])

        # gate and up: u.T = [B_g.T @ dgate.T ; B_u.T @ dup.T], each block written in place
        uT = x2.new_empty((r_g + r_u, M))
        if r_g:
            torch.mm(B_g.t(), dgate.t(), out=uT[:r_g])
        if r_u:
            torch.mm(B_u.t(), dup.t(), out=uT[r_g:])
        if need[2] and r_g:
            scaled_mm_(gB_g, dgate.t(), a[:, :r_g], s_g)
        if need[4] and r_u:
            scaled_mm_(gB_u, dup.t(), a[:, r_g:], s_u)
        one_scale = s_g == s_u or not (r_g and r_u)
        if (need[1] or need[3]) and r_g + r_u:
            if one_scale:
                scaled_mm_(gA_gu, uT, x2, s_g if r_g else s_u)
            else:
                scaled_mm_(gA_gu[:r_g], uT[:r_g], x2, s_g)
                scaled_mm_(gA_gu[r_g:], uT[r_g:], x2, s_u)
        grad_x = None
        if need[0]:
            packed, absmax, code, absmax2, code2, offset, n, k, bs, bs2 = cat_args((w_g, w_u))
            grad_x = nf4_matmul_grad_input_cat(gu, packed, absmax, code, absmax2, code2, offset, n, k,
                                               bs, bs2).contiguous()
            if r_g + r_u:
                if one_scale:
                    grad_x.addmm_(uT.t(), A_gu, alpha=s_g if r_g else s_u)
                else:
                    grad_x.addmm_(uT[:r_g].t(), A_gu[:r_g], alpha=s_g)
                    grad_x.addmm_(uT[r_g:].t(), A_gu[r_g:], alpha=s_u)
        grad_b_g = bias_grad(dgate, ctx.biases[0], need[7])
        grad_b_u = bias_grad(dup, ctx.biases[1], need[8])

        if grad_flat.dtype != ctx.param_dtype:
            grad_flat = grad_flat.to(ctx.param_dtype)  # one cast for all six
        gA_gu, gA_d, gB_g, gB_u, gB_d = unpack(grad_flat, ctx.shapes)
        pick = lambda i, t: t if need[i] else None  # noqa: E731
        return (grad_x, pick(1, gA_gu[:r_g]), pick(2, gB_g), pick(3, gA_gu[r_g:]), pick(4, gB_u),
                pick(5, gA_d), pick(6, gB_d), grad_b_g, grad_b_u, grad_b_d, None)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, act: int) -> torch.Tensor:
    """The fused MLP on ``x [..., K]`` in the compute dtype; returns
    ``[..., K']``. Without a gradient to flow it runs the same forward and
    saves nothing."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    spec = MLPSpec((gate.wargs, up.wargs, down.wargs), (gate.scaling, up.scaling, down.scaling), act,
                   x.dtype)
    tensors = (x2, gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B,
               gate.bias, up.bias, down.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = LoRAMLPFunction.apply(*tensors, spec)
    else:
        y = _forward(*tensors, spec)[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])
