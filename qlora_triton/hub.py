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

import os
from typing import Any


def _is_bnb_4bit(quant: dict[str, Any]) -> bool:
    return quant.get("quant_method") == "bitsandbytes" or bool(quant.get("load_in_4bit"))


def from_pretrained(folder: str | os.PathLike, model_class: Any = None, **kwargs: Any):
    """Load ``folder`` with ``model_class.from_pretrained`` (default
    ``transformers.AutoModelForCausalLM``; pass e.g. ``AutoModelForSequenceClassification``
    for another head); ``kwargs`` go to it unchanged (``dtype``, ``device_map``,
    ``quantization_config``, ...). A bitsandbytes 4-bit folder must be NF4
    (FP4 and 8-bit are refused with a ``ValueError``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

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
    return model_class.from_pretrained(folder, config=config, **kwargs)
