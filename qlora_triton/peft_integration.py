"""PEFT's LoRA on our ``Linear4bit``: ``peft.get_peft_model(model, LoraConfig(...))``
(and TRL's ``SFTTrainer(peft_config=...)``, which calls it) gives
:class:`LoraNF4Linear` layers, whose forward and backward run our fused
:class:`qlora_triton.lora.LoRANF4Function` (never a dequantized weight and
``F.linear``).

How we plug in (PEFT 0.21; the same hooks exist since PEFT 0.13):

- The layer: PEFT's own extension point for custom LoRA layers,
  ``LoraConfig._register_custom_module({Linear4bit: LoraNF4Linear})`` (its
  "custom models" guide), which PEFT's dispatch consults before its own
  layers. It is per config, so :func:`register` wraps the one function PEFT
  runs on every config before injecting adapters,
  ``tuners_utils._maybe_include_all_linear_layers`` (``get_peft_model``,
  ``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and TRL's
  ``SFTTrainer(peft_config=...)`` all pass through it): the wrapper registers
  the mapping on a LoRA config whose model holds our layers.
- ``target_modules="all-linear"``: the same wrapper adds our ``Linear4bit``
  layers to the names PEFT picked (PEFT matches only ``nn.Linear`` and
  ``Conv1D`` classes), leaving out the output head as PEFT does.
- In and out features: :class:`LoraNF4Linear` overrides
  ``LoraLayer._get_in_out_features``, so PEFT's "Unsupported layer type"
  warning never fires for our layers.

- ``peft.prepare_model_for_kbit_training`` freezes every parameter. On a model
  converted by ``qlora_triton.replace_linear`` that would freeze its adapters
  (0 trainable parameters, then a generic autograd error at ``backward``), so
  :func:`register` wraps that public function: the adapters that were
  trainable before stay trainable, and the rest of it (PEFT's casts, gradient
  checkpointing, input gradients) is PEFT's own.

One wrapped function for the layers, not PEFT's model classes, so that an upgrade that
renames internals breaks one place (and :func:`register` then fails loudly
at import, see ``plugins.py``). It runs when PEFT's LoRA model module is
imported.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .linear import Linear4bit, LoRALinear4bit
from .lora import lora_nf4_linear
from .quantization import dequantize_nf4, quantize_nf4

logger = logging.getLogger("qlora_triton")


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
        with warnings.catch_warnings():  # (PEFT releases that warn before asking _get_in_out_features)
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
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

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return base.in_features, base.out_features

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


def _our_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Our NF4 layers that PEFT may target (not inside a PEFT layer's own children)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def register() -> None:
    """Make PEFT's LoRA take our ``Linear4bit`` layers (idempotent; see the module docstring)."""
    from peft.tuners import tuners_utils

    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "qlora_triton", False):
        return

    def _maybe_include_all_linear_layers(peft_config, model):
        all_linear = isinstance(getattr(peft_config, "target_modules", None), str) and \
            peft_config.target_modules.lower() == "all-linear"
        peft_config = original(peft_config, model)
        ours = _our_layers(model)
        if not ours:
            return peft_config
        if hasattr(peft_config, "_register_custom_module") and Linear4bit not in (
                getattr(peft_config, "_custom_modules", None) or {}):
            peft_config._register_custom_module({Linear4bit: LoraNF4Linear})
        if all_linear:
            head = _output_head(model)
            inner = {f"{p}.{c}" for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                     for c, _ in m.named_modules() if c}
            names = {n for n, m in ours.items() if m is not head and n not in inner
                     and not isinstance(m, LoRALinear4bit)}
            peft_config.target_modules = set(peft_config.target_modules) | names
        return peft_config

    _maybe_include_all_linear_layers.qlora_triton = True
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    _wrap_prepare_model_for_kbit_training()


def _wrap_prepare_model_for_kbit_training() -> None:
    """Keep our adapters trainable through ``peft.prepare_model_for_kbit_training``
    (see the module docstring). PEFT re-exports it from ``peft.utils`` and
    ``peft``; each name already bound is replaced, and those bound later
    (``peft/__init__`` still importing) take the replaced one."""
    from peft.utils import other

    original = other.prepare_model_for_kbit_training
    if getattr(original, "qlora_triton", False):
        return

    @functools.wraps(original)
    def prepare_model_for_kbit_training(model, *args, **kwargs):
        adapters = [p for m in model.modules() if isinstance(m, LoRALinear4bit)
                    for p in (m.lora_A.weight, m.lora_B.weight) if p.requires_grad]
        out = original(model, *args, **kwargs)
        for p in adapters:
            p.requires_grad_(True)
        if adapters:
            logger.info("prepare_model_for_kbit_training: kept the %d qlora_triton adapter weights "
                        "trainable (PEFT freezes every parameter)", len(adapters))
        return out

    prepare_model_for_kbit_training.qlora_triton = True
    for name in ("peft.utils.other", "peft.utils", "peft"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "prepare_model_for_kbit_training", None) is original:
            module.prepare_model_for_kbit_training = prepare_model_for_kbit_training


register()
