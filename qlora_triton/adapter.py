"""LoRA adapters in PEFT's file format (``adapter_config.json`` +
``adapter_model.safetensors``), readable by ``peft.PeftModel.from_pretrained``.

Keys are ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``, where ``<module path>`` is the layer's name
in the model given to ``save_adapter`` (PEFT wraps that model as
``base_model.model``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .linear import Linear4bit, LoRALinear4bit, check_lora_args

logger = logging.getLogger("qlora_triton")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear4bit)}
    if not layers:
        raise ValueError("model has no LoRALinear4bit layers (call qlora_triton.replace_linear first)")
    return layers


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short suffixes (``["q_proj", "v_proj"]``) when they pick exactly our
    layers among the model's linear layers, else the full module paths."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))]
    picked = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if picked == set(names) else sorted(names)


# transformers head class-name endings -> PEFT's TaskType
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))


def model_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its head class
    (``LlamaForCausalLM`` -> ``"CAUSAL_LM"``); ``None`` when unknown (an encoder
    such as ``BertModel``: PEFT then loads the adapter into a plain ``PeftModel``)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def model_name_or_path(model: nn.Module) -> str | None:
    """The folder (or hub name) a transformers model was loaded from, if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return os.fspath(name) if name else None


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = "auto") -> None:
    """Write the LoRA adapters of ``model`` to directory ``path`` in PEFT's format.

    ``base_model_name_or_path`` defaults to the folder the model was loaded from
    (``model.config._name_or_path``), ``task_type`` (``"auto"``) to the one of
    its head (:func:`model_task_type`, ``None`` when unknown).

    Every ``LoRALinear4bit`` must share ``r``, ``lora_alpha``, ``lora_dropout``
    and ``use_rslora`` (one PEFT ``LoraConfig``); otherwise a ``ValueError``.
    """
    from safetensors.torch import save_file

    layers = _lora_layers(model)
    settings = {(m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"model: LoRA layers differ in (r, lora_alpha, lora_dropout, use_rslora): "
                         f"{sorted(settings)}; one PEFT adapter needs one setting")
    r, lora_alpha, lora_dropout, use_rslora = settings.pop()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": model_task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path or model_name_or_path(model),
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(m, part).weight
            tensors[f"{KEY_PREFIX}{name}.{part}.weight"] = weight.detach().to("cpu").contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter from directory ``path`` into the
    ``LoRALinear4bit`` layers of ``model`` (in place; returns ``model``).

    The file must hold ``lora_A`` and ``lora_B`` for exactly the model's LoRA
    layers, with matching shapes; anything else is a ``ValueError`` that names
    the offending keys (a rank other than the model's included: convert the
    model with the adapter's ``r``). The layers take the adapter's ``lora_alpha``,
    ``use_rslora`` and ``lora_dropout`` (its scaling is part of what it computes).
    """
    from safetensors.torch import load_file

    layers = _lora_layers(model)
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"path: no {os.path.basename(p)} in {os.fspath(path)!r}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ValueError(f"{config_path}: per-module {field} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias must be 'none', got {config.get('bias')!r}")
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    use_rslora = bool(config.get("use_rslora", False))
    lora_dropout = config.get("lora_dropout", 0.0)
    try:  # the same rules as the layers' own constructor
        check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    lora_dropout = float(lora_dropout)

    tensors = load_file(weights_path)
    expected = {f"{KEY_PREFIX}{name}.{part}.weight": (name, part)
                for name in layers for part in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ValueError(f"{weights_path} does not match the model's LoRA layers: "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    errors = []
    for key, (name, part) in expected.items():
        m = layers[name]
        want = (m.r, m.in_features) if part == "lora_A" else (m.out_features, m.r)
        if tuple(tensors[key].shape) != want:
            errors.append(f"{key}: shape {tuple(tensors[key].shape)}, the model's layer needs {want}")
        elif m.r != r:
            errors.append(f"{key}: the config says r={r}, the model's layer has r={m.r}")
    if errors:
        raise ValueError(f"{weights_path}: " + "; ".join(errors[:6]))

    for name, m in layers.items():
        m.lora_alpha, m.use_rslora, m.lora_dropout = lora_alpha, use_rslora, lora_dropout
        with torch.no_grad():
            for part in ("lora_A", "lora_B"):
                getattr(m, part).weight.copy_(tensors[f"{KEY_PREFIX}{name}.{part}.weight"])
    logger.info("loaded a LoRA adapter (r=%d, lora_alpha=%s) into %d layers from %s",
                r, lora_alpha, len(layers), os.fspath(path))
    return model
