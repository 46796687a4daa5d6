"""Liger-Kernel for the parts of a decoder our fused layers leave: RMSNorm,
RoPE and the fused linear cross-entropy with the frozen bf16 ``lm_head``.

:func:`apply_liger` asks :func:`qlora_triton.backend.use_liger` which path a
model gets:

* ``"liger"`` (CUDA): Liger's own public entry point
  (``liger_kernel.transformers._apply_liger_kernel_to_instance``, which picks
  ``apply_liger_kernel_to_llama``/``_mistral``/``_qwen2``... by the config's
  ``model_type``) with ``rms_norm``, ``rope`` and
  ``fused_linear_cross_entropy`` on and its SwiGLU off (the MLP is ours: LoRA
  layers on NF4 weights). Note that Liger patches the transformers modeling
  module as well as the instance (its RoPE function is a module-level
  replacement), so every model of that family built afterwards in the process
  uses Liger's RoPE (:func:`modeling_modules_kept` puts the module back, for
  the launch counter and tests).
* ``"torch"`` (CPU, meta, ``force_backend("torch")``): transformers' own norm
  and RoPE, and the loss of a labelled forward through
  :func:`qlora_triton.linear_cross_entropy.causal_lm_loss`, chunked so the
  ``[tokens, vocab]`` fp32 logits never exist. :func:`remove_liger` undoes it.

With labels, both paths return ``logits=None`` (as Liger does): the point is
not to hold them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from typing import Iterator

import torch

from . import backend
from .linear_cross_entropy import causal_lm_loss

_ATTR = "_qlora_triton_liger"


def _causal_lm(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        raise TypeError(f"model: expected a transformers causal LM with an output head, got "
                        f"{type(base).__name__}")
    return base


def _chunked_loss_forward(self, *args, labels=None, **kwargs):
    """The model's own forward with the head replaced by the chunked loss when labels are given."""
    original = type(self).forward.__get__(self)
    if labels is None and kwargs.get("shift_labels") is None:
        return original(*args, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    head = self.get_output_embeddings()
    head.forward = _identity  # the forward's "logits" are then the final hidden states
    try:
        out = original(*args, **kwargs)
    finally:
        del head.forward
    if isinstance(out, tuple):
        raise ValueError("return_dict: the chunked-loss forward returns a ModelOutput; pass return_dict=True")
    loss = causal_lm_loss(out.logits, head.weight, labels, num_items, shift_labels)
    return dataclasses.replace(out, loss=loss, logits=None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def liger_patch(base) -> None:
    """Liger-Kernel's own patching of ``base`` (a transformers causal LM), as
    :func:`apply_liger` applies it on CUDA: RMSNorm, RoPE and the fused linear
    cross-entropy on, SwiGLU off. It does not ask :func:`qlora_triton.backend.use_liger`;
    besides :func:`apply_liger`, only the launch counter (``benchmarks/launches.py``,
    Liger's Triton launches stubbed and counted) calls it on other devices.
    It patches the family's modeling module too (see the module docstring)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base, rms_norm=True, rope=True, swiglu=False,
                                    cross_entropy=False, fused_linear_cross_entropy=True)


@contextlib.contextmanager
def modeling_modules_kept() -> Iterator[None]:
    """Inside the block, :func:`liger_patch` patches models as usual; after it,
    transformers' modeling modules (``transformers.models.*``: the RoPE
    function, the RMSNorm class that Liger replaces there) are as they were
    before, so that models built later in the process are unpatched. The
    models patched inside keep Liger's modules; a model built inside gets
    Liger's classes. For the launch counter and tests, which patch and
    compare in one process."""
    saved = {name: dict(vars(module)) for name, module in list(sys.modules.items())
             if name.startswith("transformers.models.") and module is not None}
    try:
        yield
    finally:
        for name, before in saved.items():
            namespace = vars(sys.modules[name])
            for key in [k for k in namespace if k not in before]:
                del namespace[key]
            namespace.update(before)


def apply_liger(model, device: torch.device | str | None = None) -> str:
    """Give ``model`` (a transformers causal LM, or a PeftModel around one) the
    Liger kernels on CUDA, or the chunked-loss torch path elsewhere; returns
    ``"liger"`` or ``"torch"``. Calling it again returns the path already taken."""
    base = _causal_lm(model)
    if getattr(base, _ATTR, None):
        return getattr(base, _ATTR)
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("model: the output head has a bias; the fused cross-entropy takes a plain weight")
    if getattr(base.config, "final_logit_softcapping", None):
        raise ValueError("model: final_logit_softcapping is set; the chunked cross-entropy does not cap logits")
    dev = torch.device(device) if device is not None else head.weight.device
    if backend.use_liger(dev):
        liger_patch(base)
        path = "liger"
    else:
        base.forward = types.MethodType(_chunked_loss_forward, base)
        path = "torch"
    setattr(base, _ATTR, path)
    return path


def remove_liger(model) -> None:
    """Undo :func:`apply_liger`'s torch path (Liger's own patches cannot be undone)."""
    base = _causal_lm(model)
    path = getattr(base, _ATTR, None)
    if path == "liger":
        raise ValueError("model: Liger-Kernel patched this model's modules in place; it cannot be undone")
    if path == "torch":
        del base.forward
        delattr(base, _ATTR)


def liger_path(model) -> str | None:
    """``"liger"``, ``"torch"`` or None (not applied)."""
    return getattr(_causal_lm(model), _ATTR, None)
