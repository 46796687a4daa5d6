"""The package's ops in the ``torch.library`` namespace ``qlora_triton``, so that
``torch.compile`` traces them as single nodes (no graph breaks) and
``torch.library.opcheck`` can test them.

Registered with ``custom_op`` + ``register_fake`` (docs/backends.md: ``triton_op`` fails on
CPU tensors). An op takes an :class:`NF4Weight` as its tensors plus ints, since a
schema cannot hold a dataclass; each implementation dispatches with
:func:`qlora_triton.backend.use_triton` to the Triton launcher or the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import use_triton
from .weight import NF4Weight


def weight_args(qw: NF4Weight) -> tuple:
    """``qw`` as the ops take it: (packed, absmax, code, absmax2, code2, offset)
    then (n, k, blocksize, blocksize2)."""
    n, k = qw.shape
    return (qw.packed, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset,
            n, k, qw.blocksize, qw.blocksize2)


def _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2) -> NF4Weight:
    # dtype is the dense weight's default dequantize dtype; no op here reads it.
    return NF4Weight(packed=packed, absmax=absmax, shape=torch.Size((n, k)), dtype=torch.float32,
                     blocksize=blocksize, code=code, absmax2=absmax2, code2=code2, offset=offset,
                     blocksize2=blocksize2)


@torch.library.custom_op("qlora_triton::nf4_matmul", mutates_args=())
def nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
               code2: Optional[Tensor], offset: Optional[Tensor], bias: Optional[Tensor],
               n: int, k: int, blocksize: int, blocksize2: int) -> Tensor:
    """``x @ W.T (+ bias)``: x [..., k] -> [..., n] in x's dtype."""
    qw = _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2)
    x2 = x.reshape(-1, k)
    if use_triton(x.device):
        from .ops.matmul import nf4_matmul as launch
        y = launch(x2, qw, bias)
    else:
        y = reference.nf4_matmul(x2, qw, bias)
    return y.reshape(*x.shape[:-1], n)


@nf4_matmul.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("qlora_triton::nf4_matmul_grad_input", mutates_args=())
def nf4_matmul_grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                          absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
                          n: int, k: int, blocksize: int, blocksize2: int) -> Tensor:
    """``grad_y @ W``: grad_y [..., n] -> [..., k] in grad_y's dtype."""
    qw = _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2)
    g2 = grad_y.reshape(-1, n)
    if use_triton(grad_y.device):
        from .ops.matmul import nf4_matmul_grad_input as launch
        gx = launch(g2, qw)
    else:
        gx = reference.nf4_matmul_grad_input(g2, qw)
    return gx.reshape(*grad_y.shape[:-1], k)


@nf4_matmul_grad_input.register_fake
def _(grad_y, packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2):
    return grad_y.new_empty((*grad_y.shape[:-1], k))
