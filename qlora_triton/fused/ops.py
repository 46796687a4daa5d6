"""The fused blocks' ops in the ``torch.library`` namespace ``qlora_triton``
(registered as :mod:`qlora_triton.library` registers the matmul: ``define`` +
a CompositeExplicitAutograd implementation + a fake + a Meta kernel that runs
the launchers' own code with the kernels skipped, for tensor accounting).

* ``nf4_matmul_cat(x, weights...) -> [..., sum n]``: ``x`` through several NF4
  weights of one ``in_features`` (gate and up; q, k and v) as one product.
  Where the one strategy decision (:func:`qlora_triton.strategy.select_strategy`,
  asked per weight, as the unfused layers ask it) picks "dequant" for every
  weight, they are dequantized back to back into the one scratch buffer and
  multiplied ONCE against the stacked ``[sum n, k]`` view; otherwise each
  weight runs ``qlora_triton::nf4_matmul`` (its own best kernel: "gemv" at
  decode, "fused" at mid M) and the outputs are concatenated.
* ``nf4_matmul_grad_input_cat(grad_y [..., sum n], weights...) -> [..., k]``:
  the input gradient of the same product, ``sum_i grad_y_i @ W_i``, one
  product under "dequant" likewise.
* ``gated_act(gu, act) -> h`` and ``gated_act_backward_(dh!, gu!, act)``: the
  MLP's ``act(gate) * up`` and its backward (:mod:`qlora_triton.ops.activation`),
  each one Triton kernel; the plain-torch reference below on the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import forced_backend, use_triton
from ..library import _weight
from ..strategy import select_strategy, strategies

_lib = torch.library.Library("qlora_triton", "FRAGMENT")
_WEIGHTS = ("Tensor[] packed, Tensor[] absmax, Tensor[] code, Tensor?[] absmax2, Tensor?[] code2, "
            "Tensor?[] offset")
_SIZES = "int[] n, int k, int[] blocksize, int[] blocksize2"
_lib.define(f"nf4_matmul_cat(Tensor x, {_WEIGHTS}, Tensor?[] bias, {_SIZES}) -> Tensor")
_lib.define(f"nf4_matmul_grad_input_cat(Tensor grad_y, {_WEIGHTS}, {_SIZES}) -> Tensor")
_lib.define("gated_act(Tensor gu, int act) -> Tensor")
_lib.define("gated_act_backward_(Tensor(a!) dh, Tensor(b!) gu, int act) -> ()")

SILU, GELU_TANH = 0, 1


def cat_args(wargs_list) -> tuple:
    """The ``*_cat`` ops' weight arguments from a list of
    :func:`qlora_triton.library.weight_args` tuples (one ``k``)."""
    cols = list(zip(*wargs_list))
    ks = set(cols[7])
    if len(ks) != 1:
        raise ValueError(f"the weights of one product must share in_features, got {sorted(ks)}")
    return (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4]), list(cols[5]),
            list(cols[6]), cols[7][0], list(cols[8]), list(cols[9]))


def _weights(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2):
    return [_weight(*w, nn, k, b, b2) for *w, nn, b, b2 in
            zip(packed, absmax, code, absmax2, code2, offset, n, blocksize, blocksize2)]


def _all_dequant(triton: bool, M: int, n, k: int, dtype, device) -> bool:
    return triton and M > 0 and all(select_strategy(M, ni, k, dtype, device) == "dequant" for ni in n)


def _run_cat(triton: bool, x, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize,
             blocksize2) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    M = x2.shape[0]
    if _all_dequant(triton, M, n, k, x.dtype, x.device):
        from ..ops.scratch import scratch_weights

        strategies["forward", "dequant"] += len(n)
        w = scratch_weights(_weights(packed, absmax, code, absmax2, code2, offset, n, k, blocksize,
                                     blocksize2), x.dtype)
        if all(b is not None for b in bias):
            y = torch.addmm(torch.cat(bias).to(x.dtype), x2, w.t())
        else:
            y = torch.mm(x2, w.t())
            start = 0
            for b, ni in zip(bias, n):
                if b is not None:
                    y[:, start:start + ni].add_(b.to(x.dtype))
                start += ni
    else:  # each weight its own best kernel (the op decides), then one concatenation
        op = torch.ops.qlora_triton.nf4_matmul.default
        y = torch.cat([op(x2, *w, b, ni, k, bs, bs2) for *w, b, ni, bs, bs2 in
                       zip(packed, absmax, code, absmax2, code2, offset, bias, n, blocksize, blocksize2)],
                      dim=1)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], sum(n))


def _run_grad_input_cat(triton: bool, grad_y, packed, absmax, code, absmax2, code2, offset, n, k,
                        blocksize, blocksize2) -> Tensor:
    g2 = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, sum(n))
    M = g2.shape[0]
    if _all_dequant(triton, M, n, k, grad_y.dtype, grad_y.device):
        from ..ops.scratch import scratch_weights

        strategies["grad_input", "dequant"] += len(n)
        w = scratch_weights(_weights(packed, absmax, code, absmax2, code2, offset, n, k, blocksize,
                                     blocksize2), grad_y.dtype)
        gx = torch.mm(g2, w)
    else:
        op = torch.ops.qlora_triton.nf4_matmul_grad_input.default
        gx, start = None, 0
        for *w, ni, bs, bs2 in zip(packed, absmax, code, absmax2, code2, offset, n, blocksize, blocksize2):
            part = op(g2[:, start:start + ni], *w, ni, k, bs, bs2)
            gx = part if gx is None else gx.add_(part)
            start += ni
    return gx if grad_y.dim() == 2 else gx.reshape(*grad_y.shape[:-1], k)


# -- the gated activation: plain-torch reference ------------------------------------
def _act_and_slope(g: Tensor, act: int) -> tuple[Tensor, Tensor]:
    if act == SILU:
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    c = 0.7978845608028654
    t = torch.tanh(c * (g + 0.044715 * g.pow(3)))
    slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    return 0.5 * g * (1.0 + t), slope


def gated_act_reference(gu: Tensor, act: int) -> Tensor:
    """``act(gate) * up`` in fp32, rounded once to ``gu``'s dtype."""
    I = gu.shape[-1] // 2
    gate, up = gu[..., :I].float(), gu[..., I:].float()
    return (_act_and_slope(gate, act)[0] * up).to(gu.dtype)


def gated_act_backward_reference_(dh: Tensor, gu: Tensor, act: int) -> None:
    I = gu.shape[-1] // 2
    gate, up, g = gu[..., :I].float(), gu[..., I:].float(), dh.float()
    a, slope = _act_and_slope(gate, act)
    h, d_gate, d_up = a * up, g * up * slope, g * a  # (fp32 inputs alias dh and gu: compute, then write)
    dh.copy_(h)
    gu[..., :I].copy_(d_gate)
    gu[..., I:].copy_(d_up)


def _check_act(act: int) -> None:
    if act not in (SILU, GELU_TANH):
        raise ValueError(f"act must be {SILU} (SiLU) or {GELU_TANH} (GELU tanh), got {act!r}")


def _run_gated_act(triton: bool, gu: Tensor, act: int) -> Tensor:
    _check_act(act)
    if not triton:
        return gated_act_reference(gu, act)
    from ..ops.activation import gated_act

    g2 = gu if gu.dim() == 2 else gu.reshape(-1, gu.shape[-1])
    h = gated_act(g2 if g2.stride(-1) == 1 else g2.contiguous(), act)
    return h if gu.dim() == 2 else h.reshape(*gu.shape[:-1], gu.shape[-1] // 2)


def _run_gated_act_backward(triton: bool, dh: Tensor, gu: Tensor, act: int) -> None:
    _check_act(act)
    if not triton:
        return gated_act_backward_reference_(dh, gu, act)
    from ..ops.activation import gated_act_backward_

    gated_act_backward_(dh.view(-1, dh.shape[-1]), gu.view(-1, gu.shape[-1]), act)
    return None


# -- registration ----------------------------------------------------------------------
def _device_impl(run):
    def impl(first, *args):
        return run(use_triton(first.device), first, *args)
    return impl


def _meta_impl(run):
    def impl(*args):
        from ..ops.meta import kernels_skipped

        with kernels_skipped():
            return run(forced_backend() != "torch", *args)
    return impl


for _name, _run in (("nf4_matmul_cat", _run_cat), ("nf4_matmul_grad_input_cat", _run_grad_input_cat),
                    ("gated_act", _run_gated_act), ("gated_act_backward_", _run_gated_act_backward)):
    _lib.impl(_name, _device_impl(_run), "CompositeExplicitAutograd")


@torch.library.register_fake("qlora_triton::nf4_matmul_cat", lib=_lib)
def _(x, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2):
    return x.new_empty((*x.shape[:-1], sum(n)))


@torch.library.register_fake("qlora_triton::nf4_matmul_grad_input_cat", lib=_lib)
def _(grad_y, packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


@torch.library.register_fake("qlora_triton::gated_act", lib=_lib)
def _(gu, act):
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))


@torch.library.register_fake("qlora_triton::gated_act_backward_", lib=_lib)
def _(dh, gu, act):
    return None


for _name, _run in (("nf4_matmul_cat", _run_cat), ("nf4_matmul_grad_input_cat", _run_grad_input_cat),
                    ("gated_act", _run_gated_act), ("gated_act_backward_", _run_gated_act_backward)):
    _lib.impl(_name, _meta_impl(_run), "Meta", allow_override=True)

nf4_matmul_cat = torch.ops.qlora_triton.nf4_matmul_cat.default
nf4_matmul_grad_input_cat = torch.ops.qlora_triton.nf4_matmul_grad_input_cat.default
gated_act = torch.ops.qlora_triton.gated_act.default
gated_act_backward_ = torch.ops.qlora_triton.gated_act_backward_.default
