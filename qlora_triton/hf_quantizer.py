"""transformers' quantizer for our NF4 layers (quant_method ``"qlora_triton"``).

``AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4Config())``
builds the model on the meta device, swaps each target linear layer for a
``Linear4bit`` skeleton, then quantizes every target weight as transformers reads
it from the checkpoint (one tensor at a time: the dense model is never in
memory). ``save_pretrained`` writes the config with this ``quantization_config``
and the layers under bitsandbytes' keys; ``from_pretrained`` on that folder (or on
a transformers + bitsandbytes NF4 folder, through ``qlora_triton.from_pretrained``)
loads the stored bytes as they are. A folder saved from a model converted by
``replace_linear`` (whose config then holds an ``NF4Config`` with the adapters'
``lora`` settings) reloads its layers as ``LoRALinear4bit`` with their adapters.
Registered through transformers' own plugin API (``register_quantization_config``
/ ``register_quantizer``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import weakref
from typing import Any

import torch
# Submodules, not the packages: this module may be imported while
# transformers.quantizers is itself still being imported (see plugins.py).
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .codebooks import dynamic_map
from .convert import _check_targets, freeze_all_but_lora, select_linears
from .linear import _BNB_WEIGHT_KEYS, Linear4bit, LoRALinear4bit, _check_compute_dtype, check_lora_args
from .quantization import quantize_blockwise_8bit, quantize_nf4
from .weight import NESTED_BLOCKSIZE, NF4Weight, check_blocksize

QUANT_METHOD = "qlora_triton"
_NF4_STATE = ".weight.quant_state.bitsandbytes__nf4"
_FP4_STATE = ".weight.quant_state.bitsandbytes__fp4"


def _dtype_from(value: Any, name: str) -> torch.dtype | None:
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    try:
        return _check_compute_dtype(value)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


class NF4Config(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a model into ``qlora_triton.Linear4bit``.

    Args:
        blocksize: elements per absmax scale (power of two, 32..4096).
        double_quant: quantize the absmax scales to 8 bits (QLoRA's double quantization).
        compute_dtype: the layers' matmul dtype (``None``: the input's); a dtype or its name.
        target_modules: the linear layers to quantize, as ``replace_linear`` takes
            them (name suffixes or one regex); ``None``: every linear layer.
        skip_modules: layers left dense, in transformers' rule (a name prefix,
            regex or suffix); the output head, tied weights and the model's
            ``_keep_in_fp32_modules`` are always left dense.
        lora: the LoRA settings of a model converted by ``replace_linear``
            (``{"r", "lora_alpha", "lora_dropout", "use_rslora"}``, and under
            ``"layers"`` those of the layers that differ), written by
            ``replace_linear``: a folder saved from such a model reloads its
            layers as ``LoRALinear4bit`` with their adapters. Not for users to set.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | str | None = None,
                 target_modules: str | list[str] | None = None,
                 skip_modules: list[str] | None = None, lora: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {method!r}")
        if kwargs:
            raise TypeError(f"NF4Config got unexpected arguments {sorted(kwargs)}")
        self.quant_method = QUANT_METHOD
        self.blocksize = check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        self.double_quant = double_quant
        self.compute_dtype = _dtype_from(compute_dtype, "compute_dtype")
        targets = _check_targets(target_modules)
        self.target_modules = list(targets) if isinstance(targets, tuple) else targets
        if skip_modules is not None and (isinstance(skip_modules, str) or not all(
                isinstance(s, str) and s for s in skip_modules)):
            raise TypeError("skip_modules must be None or a list of module names")
        self.skip_modules = None if skip_modules is None else list(skip_modules)
        self.lora = None if lora is None else _check_lora_settings(lora)

    def lora_settings(self, name: str) -> dict[str, Any] | None:
        """The LoRA settings recorded for layer ``name`` (``None``: none recorded)."""
        if self.lora is None:
            return None
        own = self.lora.get("layers", {}).get(name)
        return own if own is not None else {k: v for k, v in self.lora.items() if k != "layers"}

    def track(self, model: torch.nn.Module) -> None:
        """Record ``model``'s LoRA settings whenever this config is written
        (``to_dict``), so that a layer's settings changed after ``replace_linear``
        (``load_adapter``, a second ``replace_linear``) are saved as they are."""
        self._model = weakref.ref(model)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    def to_dict(self) -> dict[str, Any]:
        model = getattr(self, "_model", lambda: None)()
        if model is not None:
            from .convert import lora_settings

            self.lora = lora_settings(model)
        return {
            "quant_method": self.quant_method,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch."),
            "target_modules": self.target_modules,
            "skip_modules": self.skip_modules,
            **({} if self.lora is None else {"lora": self.lora}),
        }

    @classmethod
    def from_bnb(cls, bnb: dict[str, Any]) -> "NF4Config":
        """Ours for a transformers + bitsandbytes 4-bit ``quantization_config`` (a
        dict, as in a folder's config.json): NF4 only; the stored bytes say the rest."""
        if not bnb.get("load_in_4bit"):
            raise ValueError("quantization_config: only bitsandbytes 4-bit (load_in_4bit) folders are supported")
        if bnb.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise ValueError(f"quantization_config: bnb_4bit_quant_type must be 'nf4', "
                             f"got {bnb.get('bnb_4bit_quant_type')!r}")
        if bnb.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            raise ValueError(f"quantization_config: bnb_4bit_quant_storage must be uint8, "
                             f"got {bnb.get('bnb_4bit_quant_storage')!r}")
        return cls(double_quant=bool(bnb.get("bnb_4bit_use_double_quant", False)),
                   compute_dtype=bnb.get("bnb_4bit_compute_dtype"),
                   skip_modules=bnb.get("llm_int8_skip_modules"))

    def to_bnb(self) -> dict[str, Any]:
        """The transformers + bitsandbytes ``quantization_config`` dict that loads
        a folder we saved (the bytes and keys are bitsandbytes')."""
        return {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(self.compute_dtype or torch.float32).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": self.skip_modules,
        }


_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "use_rslora")


def _check_lora_settings(lora: Any) -> dict[str, Any]:
    """``lora`` as NF4Config keeps it: the four settings, checked as the layers
    check them, and optional per-layer ones under ``"layers"``."""
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict of LoRA settings, got {type(lora).__name__}")

    def one(where: str, d: Any) -> dict[str, Any]:
        if not isinstance(d, dict) or set(d) != set(_LORA_KEYS):
            raise ValueError(f"lora{where} must have exactly the keys {list(_LORA_KEYS)}, got {d!r}")
        try:
            check_lora_args(d["r"], d["lora_alpha"], d["lora_dropout"], d["use_rslora"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"lora{where}: {e}") from None
        return {k: d[k] for k in _LORA_KEYS}

    out = one("", {k: v for k, v in lora.items() if k != "layers"})
    layers = lora.get("layers")
    if layers:
        if not isinstance(layers, dict):
            raise TypeError(f"lora['layers'] must be a dict of layer name -> settings, got {type(layers).__name__}")
        out["layers"] = {n: one(f"['layers'][{n!r}]", d) for n, d in layers.items()}
    return out


def _skeleton(out_features: int, in_features: int, bias: torch.nn.Parameter | None,
              dtype: torch.dtype, config: NF4Config, lora: dict[str, Any] | None = None) -> Linear4bit:
    """A ``Linear4bit`` (a ``LoRALinear4bit`` with ``lora`` settings) on the
    meta device with the shapes of the real one; the loader fills it (its
    non-nested scales are placeholders until then)."""
    n = out_features * in_features
    with torch.device("meta"):
        qw = NF4Weight(packed=torch.empty((n + 1) // 2, dtype=torch.uint8),
                       absmax=torch.empty(math.ceil(n / config.blocksize), dtype=torch.float32),
                       shape=(out_features, in_features), dtype=dtype, blocksize=config.blocksize,
                       code=torch.empty(16, dtype=torch.float32))
        if lora is not None:
            return LoRALinear4bit(qw, bias, compute_dtype=config.compute_dtype, **lora)
        return Linear4bit(qw, bias, compute_dtype=config.compute_dtype)


def _skeleton_for(module: torch.nn.Module, conv1d: bool, config: NF4Config,
                  lora: dict[str, Any] | None = None) -> Linear4bit:
    """The ``Linear4bit`` skeleton of a (meta) dense linear or GPT-2 ``Conv1D``."""
    out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if conv1d \
        else (module.out_features, module.in_features)
    return _skeleton(out_f, in_f, module.bias, module.weight.dtype, config, lora)


_LORA_A = ".lora_A.weight"


def _checkpoint_nf4_layers(checkpoint_files: list[str] | None) -> tuple[set[str], dict[str, int]] | None:
    """``(names of the layers a checkpoint stores in NF4, {layer: LoRA rank} of
    those it stores adapters for)``, from the safetensors headers only, or
    ``None`` when it cannot tell (no safetensors files)."""
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    from safetensors import safe_open

    names, ranks = set(), {}
    for path in checkpoint_files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith(_FP4_STATE):
                    raise ValueError(f"{path}: {key} is an FP4 weight; only NF4 is supported")
                if key.endswith(_NF4_STATE):
                    names.add(key[: -len(_NF4_STATE)])
                elif key.endswith(_LORA_A):
                    ranks[key[: -len(_LORA_A)]] = int(f.get_slice(key).get_shape()[0])
    return names, ranks


def _stored_as(name: str, stored: set[str], prefix: str) -> bool:
    return name in stored or f"{prefix}.{name}" in stored or name.removeprefix(prefix + ".") in stored


class NF4Quantize(ConversionOps):
    """Quantizes one dense weight, as transformers reads it, into its ``Linear4bit``."""

    def __init__(self, hf_quantizer: "NF4HfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        name = key.removesuffix(".weight")
        config = self.hf_quantizer.quantization_config
        module = model.get_submodule(name)
        if not isinstance(module, Linear4bit):  # the dense meta layer: its skeleton now (see below)
            parent, _, child = name.rpartition(".")
            dense, module = module, _skeleton_for(module, name in self.hf_quantizer.transposed, config)
            if dense.bias is not None and not dense.bias.is_meta:
                module.bias = dense.bias  # read before the weight
            setattr(model.get_submodule(parent), child, module)
        if name in self.hf_quantizer.transposed:  # GPT-2's Conv1D stores [in, out]
            value = value.t()
        if tuple(value.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{key}: shape {tuple(value.shape)}, the layer needs "
                             f"({module.out_features}, {module.in_features})")
        on_host = value.device.type == "cpu"
        qw = _quantize_on_host(value, config) if on_host else \
            quantize_nf4(value, blocksize=config.blocksize, double_quant=config.double_quant)
        del value
        if on_host:
            _trim_host_heap()
        return {key: _fill(module, qw, name, missing_keys)}


class NF4Deserialize(ConversionOps):
    """Loads one layer's stored NF4 tensors (bitsandbytes' keys) as they are."""

    def __init__(self, hf_quantizer: "NF4HfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        if len(input_dict) == 1:  # a dense weight (a norm, an embedding, a layer left dense)
            return input_dict
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        name = full_layer_name.removesuffix(".weight")
        module = model.get_submodule(name)
        if not isinstance(module, Linear4bit):
            raise ValueError(f"{full_layer_name}: stored in NF4 but the model's {name} is a "
                             f"{type(module).__name__}")
        qw = NF4Weight.from_state_dict(tensors, "weight")
        if tuple(qw.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{full_layer_name}: stored shape {tuple(qw.shape)}, the layer needs "
                             f"({module.out_features}, {module.in_features})")
        return {"weight": _fill(module, qw, name, missing_keys)}


# Elements per quantize call on the host: the CPU quantizer's temporaries (fp32
# copies, int64 code indices: about 20 bytes per element) stay near 20 MB instead
# of growing with the largest weight (a 2048 x 5632 one: 230 MB). A multiple of
# every blocksize, so the blocks and their scales are those of one call.
HOST_CHUNK = 1 << 20


def _quantize_on_host(value: torch.Tensor, config: NF4Config) -> NF4Weight:
    """``quantize_nf4(value)``, bit for bit, computed ``HOST_CHUNK`` elements at a time."""
    if value.numel() <= HOST_CHUNK:
        return quantize_nf4(value, blocksize=config.blocksize, double_quant=config.double_quant)
    flat = value.reshape(-1)
    parts = [quantize_nf4(flat[i:i + HOST_CHUNK], blocksize=config.blocksize, double_quant=False)
             for i in range(0, flat.numel(), HOST_CHUNK)]
    packed, absmax = torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts])
    nested: dict[str, Any] = {}
    if config.double_quant:  # over the whole weight's scales, as quantize_nf4 does
        offset = absmax.mean()
        code2 = dynamic_map(value.device)
        absmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code2, NESTED_BLOCKSIZE)
        nested = dict(absmax2=absmax2, code2=code2, offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=value.shape, dtype=value.dtype,
                     blocksize=config.blocksize, code=parts[0].code, **nested)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _trim_host_heap() -> None:
    """Hand the freed dense tensor and quantization temporaries back to the OS.
    glibc keeps freed chunks below its (growing) mmap threshold in the heap, so
    without this the process's RSS climbs towards the dense model's size while
    loading (measured on a 1 GB bf16 checkpoint read with pread: 1.11x of it
    retained, where the quantized model needs under half)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _fill(module: Linear4bit, qw: NF4Weight, name: str, missing_keys: set | None) -> torch.Tensor:
    """Put ``qw`` into the skeleton ``module``; its companion keys are loaded too."""
    module._set_quant_weight(qw)
    module._is_hf_initialized = True
    if missing_keys is not None:
        for suffix in _BNB_WEIGHT_KEYS:
            missing_keys.discard(f"{name}.weight{suffix}")
    return module.weight


# transformers before 5.25 (5.17) has no get_load_operations and builds no
# deserializing converter from serialized_names (get_weight_conversions spells
# it out); it also casts each checkpoint tensor to the dtype of the parameter it
# fills, hence the dense meta layers kept until their weight arrives (on_load).
_OLD_LOADER = not hasattr(HfQuantizer, "get_load_operations")


class NF4HfQuantizer(HfQuantizer):
    """The quantizer transformers runs for an ``NF4Config`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names = {"weight": ["weight" + suffix for suffix in _BNB_WEIGHT_KEYS]}

    def __init__(self, quantization_config: NF4Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.transposed: set[str] = set()
        self.on_load: set[str] = set()  # the layers quantized as their weight is read

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return name == "weight" and (isinstance(module, Linear4bit) or param_name.removesuffix(".weight")
                                     in self.on_load)

    def _targets(self, model, checkpoint_files) -> dict[str, tuple[torch.nn.Module, str]]:
        config = self.quantization_config
        chosen, _ = select_linears(model, config.target_modules, default_skip=set())
        chosen = {n: v for n, v in chosen.items() if v[1] in ("linear", "conv1d")}
        if self.pre_quantized:
            stored = _checkpoint_nf4_layers(checkpoint_files)
            if stored is not None:  # the checkpoint says which layers it holds in NF4
                stored, ranks = stored
                prefix = model.base_model_prefix
                chosen = {n: v for n, v in chosen.items() if _stored_as(n, stored, prefix)}
                self.lora = self._lora_layers(chosen, ranks, prefix)
                return chosen
        skip = self.get_modules_to_not_convert(model, config.skip_modules, model._keep_in_fp32_modules,
                                               add_default_skips=True)
        return {n: v for n, v in chosen.items() if should_convert_module(n, skip)}

    def _lora_layers(self, chosen: dict, ranks: dict[str, int], prefix: str) -> dict[str, dict[str, Any]]:
        """``{layer: LoRA settings}`` of the targets the checkpoint stores
        adapters for, from the config's ``lora`` (written by ``replace_linear``)."""
        config = self.quantization_config
        found = {}
        for name in chosen:
            key = next((k for k in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")) if k in ranks), None)
            if key is None:
                continue
            settings = config.lora_settings(name)
            if settings is None:
                raise ValueError(f"the checkpoint holds LoRA adapters ({key}.lora_A/lora_B) but its "
                                 "quantization_config records no LoRA settings (lora_alpha...): load the base "
                                 "and its adapter separately (qlora_triton.save_adapter / load_adapter, or PEFT)")
            if settings["r"] != ranks[key]:
                raise ValueError(f"{key}.lora_A.weight has rank {ranks[key]}, the quantization_config's "
                                 f"lora settings say r={settings['r']}")
            found[name] = settings
        return found

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.lora = {}
        targets = self._targets(model, checkpoint_files)
        if not targets:
            raise ValueError(f"quantization_config: target_modules={self.quantization_config.target_modules!r} "
                             "matched no linear layer of the model")
        for name, (module, kind) in targets.items():
            if kind == "conv1d":
                self.transposed.add(name)
            if not self.pre_quantized:
                # Quantized on load: the dense meta layer stays until its weight arrives
                # (NF4Quantize swaps in the skeleton), so that transformers reads the
                # checkpoint's weight as a float tensor. transformers 5.17 (the GPU
                # machine's) casts each tensor to the model's parameter first, and a
                # skeleton's parameter is the packed uint8 storage.
                self.on_load.add(name)
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    _skeleton_for(module, kind == "conv1d", self.quantization_config, self.lora.get(name)))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        unloaded = [n for n, m in model.named_modules() if (isinstance(m, Linear4bit) or n in self.on_load)
                    and m.weight.is_meta]
        if unloaded:
            raise ValueError(f"the checkpoint holds no weight for {unloaded[:6]}"
                             f"{' ...' if len(unloaded) > 6 else ''}")
        for m in model.modules():
            if isinstance(m, Linear4bit) and m.bias is not None:
                m.bias.requires_grad_(False)  # frozen, as Linear4bit.from_linear makes it
        if getattr(self, "lora", None):  # as replace_linear left it: only the adapters train
            freeze_all_but_lora(model)
        return model

    def get_quantize_ops(self):
        return NF4Quantize(self)

    def get_load_operations(self):
        return {"deserialize": NF4Deserialize}

    def get_weight_conversions(self):
        # What transformers 5.25's base class builds from serialized_names and
        # get_load_operations; older ones (5.17) build nothing (a pre-quantized
        # folder would then go to NF4Quantize), so it is spelled out for them.
        from transformers.core_model_loading import WeightConverter

        if not _OLD_LOADER:
            return super().get_weight_conversions()
        if not self.pre_quantized:
            return []
        # (that loader takes the first source pattern a key matches: "weight" last)
        return [WeightConverter(sorted(names, key=len, reverse=True), param, [NF4Deserialize(self)])
                for param, names in self.serialized_names.items()]

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register ``NF4Config`` and the quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NF4Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NF4HfQuantizer)


register()
