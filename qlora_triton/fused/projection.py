"""What a fused block takes from each of its projections: the NF4 weight's op
arguments, the adapters and bias in the compute dtype, and the scaling.

A ``Linear4bit`` (no adapter) takes part as a LoRA layer of rank 0: empty
``A [0, K]`` and ``B [N, 0]``, whose products are empty or add nothing, so
one code path serves blocks where only some projections carry adapters.
"""

from __future__ import annotations

import dataclasses

import torch

from ..linear import Linear4bit, LoRALinear4bit


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection of a fused block, ready for its autograd Function."""

    lora_A: torch.Tensor        # [r, K] compute dtype (r = 0 without an adapter)
    lora_B: torch.Tensor        # [N, r]
    bias: torch.Tensor | None   # [N]
    wargs: tuple                # qlora_triton.library.weight_args of the NF4 weight
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def out_features(self) -> int:
        return self.wargs[6]


def projection(layer: Linear4bit, dtype: torch.dtype) -> Projection:
    """``layer``'s part of a fused block, computing in ``dtype`` (casts as the
    layer's own forward casts: differentiable in training, cached in eval)."""
    wargs = layer._weight()[1]
    bias = layer._cast("bias", layer.bias, dtype)
    if isinstance(layer, LoRALinear4bit):
        return Projection(layer._cast("lora_A", layer.lora_A.weight, dtype),
                          layer._cast("lora_B", layer.lora_B.weight, dtype), bias, wargs, layer.scaling)
    device = layer.weight.device
    return Projection(torch.empty((0, layer.in_features), dtype=dtype, device=device),
                      torch.empty((layer.out_features, 0), dtype=dtype, device=device), bias, wargs, 0.0)


def scaled_mm(like: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in ONE product (``addmm`` with ``beta = 0`` ignores
    ``like``, which only has the output's shape and dtype: no multiply after)."""
    return torch.addmm(like, a, b, beta=0, alpha=scale)


def bias_grad(g: torch.Tensor, bias: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """``dL/db = g.sum(0)``, summed in fp32 as :class:`qlora_triton.matmul.NF4Matmul` does."""
    if not needed or bias is None:
        return None
    return g.sum(0, dtype=torch.float32).to(bias.dtype)
