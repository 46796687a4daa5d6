"""``nf4_matmul``: ``x @ W.T (+ bias)`` through a frozen NF4 weight, with autograd.

Layers: Triton kernels and their launchers in :mod:`qlora_triton.ops.gemv`,
:mod:`~qlora_triton.ops.gemm` and :mod:`~qlora_triton.ops.grad_input` (entry
points in :mod:`qlora_triton.ops.matmul`, docs/kernels.md), the
``torch.library`` ops in :mod:`qlora_triton.library` (they pick the backend),
the autograd Function and the checked public entry points here.
"""

from __future__ import annotations

from typing import Any

import torch

from .library import weight_args  # importing it registers torch.ops.qlora_triton.*
from .quantization import check_float_tensor
from .weight import FLOAT_DTYPES, NF4Weight

_nf4_matmul_op = torch.ops.qlora_triton.nf4_matmul.default
_grad_input_op = torch.ops.qlora_triton.nf4_matmul_grad_input.default


class NF4Matmul(torch.autograd.Function):
    r"""``y = x W^T + b`` with W frozen in NF4.

    Shapes: x [M, K] (leading dims flattened into M), W [N, K], b [N], y [M, N].
    Writing g = dL/dy [M, N]:

    * ``y_mn = sum_k x_mk W_nk + b_n`` gives ``dL/dx_mk = sum_n g_mn W_nk``, i.e.
      ``grad_x = g @ W`` ([M, N] @ [N, K]): the ``nf4_matmul_grad_input`` op, through
      the packed weight again under the same strategy as the forward
      (:mod:`qlora_triton.strategy`): the fused kernel decodes the same W tiles,
      "dequant" dequantizes into its scratch buffer again (nothing is saved).
    * ``dL/db_n = sum_m g_mn``: a column sum of g (in fp32, cast to b's dtype).
    * ``dL/dW = g^T @ x`` would be a dense [N, K] gradient of a quantized weight.
      QLoRA freezes the base weight (only adapters train), so that path does not
      exist: :func:`nf4_matmul` rejects weight tensors that require grad, and the
      weight's inputs get ``None``.

    Arguments after ``bias`` are :func:`qlora_triton.library.weight_args` of the weight.
    """

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2):
        # The frozen weight is kept by reference, not through save_for_backward,
        # so activation-offloading hooks (save_on_cpu) never copy it.
        ctx.weight = (packed, absmax, code, absmax2, code2, offset)
        ctx.sizes = (n, k, blocksize, blocksize2)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _nf4_matmul_op(x, packed, absmax, code, absmax2, code2, offset, bias,
                              n, k, blocksize, blocksize2)

    @staticmethod
    def backward(ctx, grad_y):
        if any(ctx.needs_input_grad[2:8]):
            raise RuntimeError("nf4_matmul: the NF4 weight is frozen; it has no gradient")
        n = ctx.sizes[0]
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input_op(grad_y, *ctx.weight, *ctx.sizes)
        if ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, n).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (grad_x, grad_b) + (None,) * 10


def _check_weight(qw: Any) -> tuple[int, int]:
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    if len(qw.shape) != 2:
        raise ValueError(f"qw must be a 2-D [out_features, in_features] weight, got shape {tuple(qw.shape)}")
    for name, t in qw.tensors().items():
        if t.requires_grad:
            raise ValueError(f"qw.{name} requires grad, but the NF4 weight is frozen and has no "
                             "gradient (train an adapter on top of it instead)")
    return qw.shape[0], qw.shape[1]


def _check_input(name: str, t: Any, features: int, what: str, qw: NF4Weight) -> None:
    check_float_tensor(name, t)
    if t.dim() == 0 or t.shape[-1] != features:
        raise ValueError(f"{name} must have shape [..., {features}] ({what} of qw, shape "
                         f"{tuple(qw.shape)}), got {tuple(t.shape)}")
    if t.device != qw.device:
        raise ValueError(f"{name} is on {t.device} but qw is on {qw.device}")


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` of shape ``[..., K]`` (fp32, fp16 or bf16) and
    ``qw`` of shape ``[N, K]``; returns ``[..., N]`` in ``x.dtype``. Differentiable
    in ``x`` and ``bias``; the weight is frozen."""
    N, K = _check_weight(qw)
    _check_input("x", x, K, "in_features", qw)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},) (out_features of qw), got {tuple(bias.shape)}")
        if bias.device != qw.device:
            raise ValueError(f"bias is on {bias.device} but qw is on {qw.device}")
    return nf4_matmul_args(x, weight_args(qw), bias)


def nf4_matmul_args(x: torch.Tensor, args: tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nf4_matmul` on ``args = weight_args(qw)`` of a weight checked
    before (modules keep both): no checks, and the autograd Function only
    when a gradient can flow, so a decode step is the op alone."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return NF4Matmul.apply(x, bias, *args)
    packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2 = args
    return _nf4_matmul_op(x, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2)


def nf4_matmul_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W`` for ``grad_y`` of shape ``[..., N]``; returns ``[..., K]`` in
    ``grad_y.dtype``: the input gradient of :func:`nf4_matmul`, through the packed
    weight (not differentiable itself)."""
    N, K = _check_weight(qw)
    _check_input("grad_y", grad_y, N, "out_features", qw)
    return nf4_matmul_grad_input_args(grad_y, weight_args(qw))


def nf4_matmul_grad_input_args(grad_y: torch.Tensor, args: tuple) -> torch.Tensor:
    """:func:`nf4_matmul_grad_input` on ``args = weight_args(qw)``, unchecked."""
    return _grad_input_op(grad_y, *args)
