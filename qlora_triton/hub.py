"""``from_pretrained``: any model folder into our NF4 layers, without bitsandbytes.

A thin wrapper over transformers' ``from_pretrained``. A dense folder loads as
transformers loads it (pass ``quantization_config=NF4Config()`` to quantize on
load), one we saved reloads its NF4 bytes, and a transformers + bitsandbytes
4-bit NF4 folder is handed to our quantizer in place of bitsandbytes' (whose
keys and bytes are the same format): its stored bytes are used as they are.
transformers itself refuses a passed ``quantization_config`` of another class
than the folder's, so the folder's config is the one replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def _is_bnb_4bit(quant: dict[str, Any]) -> bool:
    return quant.get("quant_method") == "bitsandbytes" or bool(quant.get("load_in_4bit"))


def safetensors_files(folder: Path) -> list[str]:
    """The safetensors files of a local model folder: those its index names, or
    ``model.safetensors``; empty when it has neither."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (folder / "model.safetensors").is_file() else []


def _pread_state_dict(folder: str | os.PathLike, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Lazy slices of every tensor of a local safetensors folder, read with
    ``pread`` when transformers materializes them (nothing is memory-mapped)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = safetensors_files(folder)
    if not files:
        raise ValueError(f"read='pread' needs a local folder of safetensors files, got {os.fspath(folder)!r}")
    state_dict: dict[str, Any] = {}
    for name in files:
        f = stack.enter_context(safe_open(folder / name, framework="pt", backend="pread"))
        state_dict.update({key: f.get_slice(key) for key in f.keys()})
    return state_dict


def _stores_nf4(folder: str | os.PathLike) -> bool:
    """Whether a local folder's safetensors hold bitsandbytes NF4 tensors (headers only)."""
    from .hf_quantizer import _checkpoint_nf4_layers

    path = Path(folder)
    if not path.is_dir():
        return False
    stored = _checkpoint_nf4_layers([str(path / f) for f in safetensors_files(path)])
    return bool(stored and stored[0])


def from_pretrained(folder: str | os.PathLike, model_class: Any = None, read: str = "mmap", **kwargs: Any):
    """Load ``folder`` with ``model_class.from_pretrained`` (default
    ``transformers.AutoModelForCausalLM``; pass e.g. ``AutoModelForSequenceClassification``
    for another head); ``kwargs`` go to it unchanged (``dtype``, ``device_map``,
    ``quantization_config``, ...). A bitsandbytes 4-bit folder must be NF4
    (FP4 and 8-bit are refused with a ``ValueError``). A folder of NF4 tensors
    without a ``quantization_config`` (saved by an older ``qlora_triton``)
    loads as ours; if it also holds adapters, a ``ValueError`` says how to load them.

    ``read="pread"`` reads each tensor of a local safetensors folder into its own
    buffer instead of transformers' memory map, so the checkpoint's pages never
    count in the process's RSS (with ``NF4Config``, only the tensor being
    quantized is held dense); ``"mmap"`` (default) is transformers' own read."""
    if read not in ("mmap", "pread"):
        raise ValueError(f"read must be 'mmap' or 'pread', got {read!r}")
    from .extras import require

    transformers = require("transformers", "qlora_triton.from_pretrained")
    AutoConfig, AutoModelForCausalLM = transformers.AutoConfig, transformers.AutoModelForCausalLM

    from .hf_quantizer import NF4Config

    model_class = AutoModelForCausalLM if model_class is None else model_class
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"model_class must be a transformers model class, got {model_class!r}")
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(folder, **{k: kwargs[k] for k in ("revision", "trust_remote_code")
                                                       if k in kwargs})
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if _is_bnb_4bit(quant) or quant.get("load_in_8bit"):
            if quant.get("load_in_8bit"):
                raise ValueError(f"folder: {os.fspath(folder)!r} holds a bitsandbytes 8-bit model; "
                                 "only 4-bit NF4 folders are supported")
            config.quantization_config = NF4Config.from_bnb(quant).to_dict()
    elif "quantization_config" not in kwargs and _stores_nf4(folder):
        # NF4 tensors but no quantization_config (a model converted by
        # replace_linear and saved before it recorded one): ours, as stored.
        config.quantization_config = NF4Config().to_dict()
    with contextlib.ExitStack() as stack:
        if read == "pread":
            if "state_dict" in kwargs:
                raise ValueError("read='pread' builds the state_dict itself; do not pass state_dict")
            # transformers takes a state_dict only in place of the folder's name
            # (an Auto class then needs a name: resolve it to the config's model class).
            state_dict = _pread_state_dict(folder, stack)
            mapping = getattr(model_class, "_model_mapping", None)
            concrete = mapping[type(config)] if mapping is not None else model_class
            return concrete.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
        return model_class.from_pretrained(folder, config=config, **kwargs)


def merge_and_quantize(model: Any, folder: str | os.PathLike, double_quant: bool = True) -> None:
    """Write ``model`` with its LoRA adapters merged and requantized to NF4 as a
    transformers + bitsandbytes 4-bit folder: ``config.json`` carries
    bitsandbytes' own ``quantization_config`` (``load_in_4bit``, NF4), the
    weights bitsandbytes' keys and bytes. It loads unchanged with
    ``AutoModelForCausalLM.from_pretrained(folder)`` where bitsandbytes is
    installed, and with ``qlora_triton.from_pretrained(folder)`` without it.

    ``model`` (a transformers model with ``LoRALinear4bit`` layers) is not
    changed. Each merged weight ``W + s * B @ A`` is computed in float32 and
    quantized once (blocksize 64 as bitsandbytes, ``double_quant`` as asked),
    so it differs from the unmerged model by NF4's rounding of the merged
    weight (docs/recipes.md gives measured figures). Layers without an adapter
    keep their NF4 bytes; dense linear layers stay dense (named in
    ``llm_int8_skip_modules``). The folder is replaced atomically."""
    from .convert import linear_modules, merged_nf4
    from .hf_quantizer import NF4Config
    from .linear import Linear4bit, LoRALinear4bit

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}
    if not lora:
        raise ValueError("model has no LoRALinear4bit layers (convert it with qlora_triton.replace_linear "
                         "and train it first): nothing to merge")
    state_dict = model.state_dict()
    for name, layer in lora.items():
        for key in [k for k in state_dict if k.startswith(name + ".")]:
            del state_dict[key]
        merged = merged_nf4(layer, double_quant=double_quant)
        state_dict.update({f"{name}.{k}": v for k, v in merged.state_dict().items()})
    dense = sorted(n for n, (_, kind) in linear_modules(model).items() if kind in ("linear", "conv1d"))
    nf4 = [m for m in model.modules() if isinstance(m, Linear4bit)]
    compute = next((m.compute_dtype for m in nf4 if m.compute_dtype is not None), None) or nf4[0]._qdtype
    quant = NF4Config(double_quant=double_quant, compute_dtype=compute, skip_modules=dense or None).to_bnb()

    def write(tmp: str) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["quantization_config"] = quant
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    from .adapter import _replace_folder

    _replace_folder(os.fspath(folder), write)  # atomic: the old folder or the new one
