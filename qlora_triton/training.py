"""``prepare_for_kbit_training``: make a quantized model ready to train adapters.

PEFT's ``prepare_model_for_kbit_training`` upcasts every non-quantized weight
to float32 and freezes every parameter (after a conversion it freezes the
adapters too: 0 trainable parameters). This one changes no dtype and freezes
nothing: it makes the inputs of the first layer require grad (so gradient
checkpointing has something to differentiate when the embeddings are frozen)
and turns gradient checkpointing on.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Enable input grads and (by default) non-reentrant gradient checkpointing on
    a transformers model; no weight is upcast or frozen. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(use_gradient_checkpointing, bool):
        raise TypeError(f"use_gradient_checkpointing must be a bool, got {type(use_gradient_checkpointing).__name__}")
    if use_gradient_checkpointing:
        enable_checkpointing(model, gradient_checkpointing_kwargs)
    enable_inputs = getattr(model, "enable_input_require_grads", None)
    if callable(enable_inputs):
        enable_inputs()
    else:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise TypeError(f"model: {type(model).__name__} has no input embeddings to make require grad")
        embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return model


def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict[str, Any] | None = None) -> None:
    """Turn on a transformers model's activation (gradient) checkpointing,
    non-reentrant unless ``checkpoint_kwargs`` says otherwise, by the name its
    transformers has: ``activation_checkpointing_enable`` (newer releases, where
    ``gradient_checkpointing_enable`` is a deprecated alias to be removed in
    v6), else ``gradient_checkpointing_enable`` (5.17, the GPU machine's)."""
    kwargs = checkpoint_kwargs or {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise TypeError(f"model: {type(model).__name__} has no activation_checkpointing_enable() or "
                        "gradient_checkpointing_enable() (a transformers PreTrainedModel has)")
    enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: nn.Module) -> None:
    """Turn a transformers model's activation checkpointing off (either name, as
    :func:`enable_checkpointing`)."""
    disable = getattr(model, "activation_checkpointing_disable", None)
    (disable if callable(disable) else model.gradient_checkpointing_disable)()
