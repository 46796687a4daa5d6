"""Model conversion: ``replace_linear`` swaps ``nn.Linear`` layers for
``LoRALinear4bit`` (quantizing them one at a time), ``merge_and_unload`` turns
them back into dense ``nn.Linear`` layers holding ``W + s * B @ A``."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .linear import Linear4bit, LoRALinear4bit, _check_compute_dtype, check_lora_args
from .weight import check_blocksize

logger = logging.getLogger("qlora_triton")


@dataclasses.dataclass
class ConversionReport:
    """What ``replace_linear`` did. ``total_params`` counts each NF4 weight at
    its dense element count (as PEFT's ``print_trainable_parameters`` does)."""

    replaced: list[str]
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} Linear layers | trainable params: "
                f"{self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {self.trainable_percent:.4f}")


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: ``lm_head``, the module ``get_output_embeddings()``
    returns, and any Linear whose weight is tied to an embedding."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is out and out is not None:
            heads.add(name)
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            heads.add(name)
    return heads


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_targets(target_modules) -> str | tuple[str, ...] | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: not a valid regex ({e}): {target_modules!r}") from None
        return target_modules
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError("target_modules must be a regex string or a non-empty list of module-name suffixes")
    return targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; NF4 weights count at their dense size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def freeze_all_but_lora(model: nn.Module) -> None:
    """Make the LoRA adapters the model's only trainable parameters."""
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoRALinear4bit)
                   for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)


def replace_linear(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
                   lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   progress: bool = True) -> ConversionReport:
    """Swap matching ``nn.Linear`` modules of ``model`` (in place) for
    ``LoRALinear4bit`` and freeze every parameter that is not a LoRA adapter.

    Args:
        target_modules: ``None`` (every ``nn.Linear`` except the output head:
            ``lm_head``, ``model.get_output_embeddings()``, or a Linear tied to
            an embedding), a list of name suffixes (PEFT's rule: the full name,
            or a suffix after a dot), or a regex matched against the whole name.
            Only modules of type exactly ``nn.Linear`` are swapped: subclasses
            (e.g. ``nn.MultiheadAttention.out_proj``, whose owner reads the
            dense weight directly) are left alone.
        r, lora_alpha, lora_dropout, use_rslora: the adapters (see ``LoRALinear4bit``).
        blocksize, double_quant: the NF4 format.
        compute_dtype: the layers' compute dtype (``None``: the input's).
        device: quantize on this device (default: each layer's own). Layers are
            converted one at a time and each dense weight is released as soon
            as it is replaced, so the model is never held twice.
        progress: show a tqdm bar over the layers.

    Returns a :class:`ConversionReport` (also logged at INFO on "qlora_triton").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _check_targets(target_modules)
    check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    check_blocksize(blocksize)
    _check_compute_dtype(compute_dtype)

    heads = _output_head_names(model) if targets is None else set()
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and name not in heads and (targets is None or _matches(name, targets))]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model "
                         f"(its Linear layers: {linears[:8]}{' ...' if len(linears) > 8 else ''})")

    for name in tqdm(names, desc="qlora_triton: quantizing", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = LoRALinear4bit.from_linear(
            getattr(parent, child), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
            compute_dtype=compute_dtype, device=device)
        setattr(parent, child, new)  # drops the last reference to the dense layer
        del new

    freeze_all_but_lora(model)
    trainable, total = count_parameters(model)
    report = ConversionReport(replaced=names, trainable_params=trainable, total_params=total)
    logger.info("%s", report)
    return report


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear4bit`` by a dense ``nn.Linear`` holding
    ``W + s * B @ A`` and every ``Linear4bit`` by one holding the dequantized
    ``W`` (in the dtype the weight was quantized from, on its device), one
    layer at a time; returns ``model`` (changed in place). The new weights are
    frozen (``requires_grad=False``), like the base they come from."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, Linear4bit):
        return _dense(model)
    names = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _dense(getattr(parent, child)))
    return model


def _dense(layer: Linear4bit) -> nn.Linear:
    with torch.no_grad():
        if isinstance(layer, LoRALinear4bit):
            weight = layer.merged_weight()
        else:
            weight = layer.dequantized_weight()
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(weight.dtype, copy=True), requires_grad=False)
    return dense
