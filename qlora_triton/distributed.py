"""Several ranks: FSDP2 for a QLoRA model (placeholder of the coordinator's
branch: the storage helper's version replaces this file at the merge)."""

from __future__ import annotations

import torch
from torch import nn


def shard_model(model: nn.Module, mesh=None, mp_policy=None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def base_bytes(model: nn.Module) -> dict:
    from .linear import Linear4bit

    local = total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for t in m.quant_weight.tensors().values():
                total += t.numel() * t.element_size()
                local += t.numel() * t.element_size()
    return {"local": local, "total": total}


def load_sharded(model_dir: str, targets, r: int, lora_alpha: float, lora_dropout: float,
                 device: torch.device, compute_dtype=None):
    import qlora_triton as qt
    from .finetune.model import load_model

    model = load_model(model_dir, torch.bfloat16, device)
    names = targets(model)
    qt.replace_linear(model, target_modules=names, r=r, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, progress=False)
    return shard_model(model), names
