"""PEFT's LoRA on our ``Linear4bit``: ``peft.get_peft_model(model, LoraConfig(...))``
(and TRL's ``SFTTrainer(peft_config=...)``, which calls it) gives
:class:`LoraNF4Linear` layers, whose forward and backward run our fused
:class:`qlora_triton.lora.LoRANF4Function` (never a dequantized weight and
``F.linear``).

PEFT 0.21 takes custom LoRA layers per ``LoraConfig`` (its experimental
``LoraConfig._register_custom_module``); :func:`register` makes every config
carry ours by wrapping ``LoraModel._create_new_module`` so that a target whose
base is a ``Linear4bit`` registers :class:`LoraNF4Linear` on the config first.
It runs when PEFT's LoRA model module is imported (see ``plugins.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .linear import Linear4bit, LoRALinear4bit
from .lora import lora_nf4_linear
from .quantization import dequantize_nf4, quantize_nf4


class LoraNF4Linear(nn.Module, LoraLayer):
    """PEFT's LoRA layer on a frozen :class:`qlora_triton.Linear4bit` base.

    The first active adapter runs fused with the base (one ``LoRANF4Function``:
    ``x @ W.T + b + s * dropout(x) @ A.T @ B.T``); any further active adapter adds
    its rank-r path. ``disable_adapter()`` runs the base alone. Merging
    dequantizes, adds ``s * B @ A`` and requantizes (lossy, as for bitsandbytes).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if isinstance(base, LoRALinear4bit):
            raise ValueError("target has qlora_triton adapters already (a LoRALinear4bit from replace_linear); "
                             "give PEFT a model whose layers are Linear4bit (loaded with NF4Config)")
        if config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError("LoraConfig: DoRA and aLoRA are not supported on qlora_triton layers")
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
        return None  # plain LoRA only (DoRA and aLoRA are refused in __init__)

    def _dtypes(self, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """``(compute, output)`` dtypes, by Linear4bit's rule: autocast's, else the
        base's compute dtype (or the input's) in and the input's out."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return dtype, dtype
        return self.get_base_layer().compute_dtype or x.dtype, x.dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names (mixed adapters in one batch) is not supported on qlora_triton layers")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return base(x, *args, **kwargs)
        dtype, out_dtype = self._dtypes(x)
        first, *rest = active
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            bias = None if base.bias is None else base.bias.to(dtype)
            y = lora_nf4_linear(xc, base.quant_weight, bias, self.lora_A[first].weight.to(dtype),
                                self.lora_B[first].weight.to(dtype), self.scaling[first],
                                self._dropout_p(first))
            for name in rest:
                a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
                y = y + (self.lora_dropout[name](xc) @ a.t() @ b.t()) * self.scaling[name]
        return y.to(out_dtype)

    def _dropout_p(self, adapter: str) -> float:
        dropout = self.lora_dropout[adapter]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) and self.training else 0.0

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def _requantize(self, sign: float, adapter: str) -> None:
        base = self.get_base_layer()
        qw = base.quant_weight
        dense = dequantize_nf4(qw, torch.float32) + sign * self.get_delta_weight(adapter).to(qw.device)
        new = Linear4bit(quantize_nf4(dense.to(qw.dtype), blocksize=qw.blocksize, double_quant=qw.double_quant),
                         base.bias, compute_dtype=base.compute_dtype)
        self.base_layer = new

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            warnings.warn("merging LoRA into an NF4 weight requantizes it: outputs change by the rounding")
            if safe_merge and not torch.isfinite(self.get_delta_weight(adapter)).all():
                raise ValueError(f"NaNs in the delta weight of adapter {adapter!r}")
            self._requantize(1.0, adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._requantize(-1.0, adapter)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register() -> None:
    """Make PEFT's LoRA dispatch pick :class:`LoraNF4Linear` for our layers (idempotent)."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._create_new_module
    if getattr(original, "qlora_triton", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Linear4bit) and Linear4bit not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({Linear4bit: LoraNF4Linear})
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.qlora_triton = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


register()
