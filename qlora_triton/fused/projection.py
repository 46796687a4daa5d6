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

    lora_A: torch.Tensor        # [r, K] the parameter itself, in its own dtype (r = 0 without an adapter)
    lora_B: torch.Tensor        # [N, r]
    bias: torch.Tensor | None   # [N], in the compute dtype
    wargs: tuple                # qlora_triton.library.weight_args of the NF4 weight
    scaling: float


def projection(layer: Linear4bit, dtype: torch.dtype) -> Projection:
    """``layer``'s part of a fused block computing in ``dtype``. The adapters
    are passed as they are: the block casts all of them at once
    (:func:`pack_adapters`)."""
    wargs = layer._weight()[1]
    bias = layer._cast("bias", layer.bias, dtype)
    if isinstance(layer, LoRALinear4bit):
        return Projection(layer.lora_A.weight, layer.lora_B.weight, bias, wargs, layer.scaling)
    device = layer.weight.device
    return Projection(torch.empty((0, layer.in_features), dtype=dtype, device=device),
                      torch.empty((layer.out_features, 0), dtype=dtype, device=device), bias, wargs, 0.0)


def adapter_dtype(tensors) -> torch.dtype | None:
    """The one dtype of a block's adapter parameters (the empty stand-ins of
    layers without an adapter do not count); None when there are none."""
    dtypes = {t.dtype for t in tensors if t.numel()}
    if len(dtypes) > 1:
        raise ValueError(f"a fused block's adapters must share one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else None


def pack_adapters(tensors, dtype: torch.dtype) -> torch.Tensor:
    """All of a block's adapter matrices, flattened back to back, in ``dtype``:
    one concatenation and one cast (two launches) where each layer's own
    forward casts each matrix (two per layer). Consecutive ``A`` matrices of
    one ``in_features`` form one stacked ``[sum r, K]`` view of it."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.dtype == dtype else flat.to(dtype)


def unpack(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Views of ``flat`` with ``shapes``, back to back (a shape may be a
    stacked region: several matrices of one width)."""
    out, start = [], 0
    for shape in shapes:
        size = shape[0] * shape[1]
        out.append(flat[start:start + size].view(shape))
        start += size
    return out


def bias_grad(g: torch.Tensor, bias: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """``dL/db = g.sum(0)``, summed in fp32 as :class:`qlora_triton.matmul.NF4Matmul` does."""
    if not needed or bias is None:
        return None
    return g.sum(0, dtype=torch.float32).to(bias.dtype)
