"""Attention on the meta device, accounted as the GPU's flash kernel holds it.

On the meta device ``scaled_dot_product_attention`` takes torch's math path,
which materialises the ``[batch, heads, S, S]`` scores (and their softmax, and
in the backward their gradient): at 8192 tokens that is 8 GiB per 65B layer, a
tensor a GPU run never holds. For tensor accounting (:mod:`qlora_triton.tensor_memory`)
a preset model on meta therefore runs its attention through
``aten._scaled_dot_product_flash_attention`` directly: torch's own meta kernel
and autograd formula of the kernel ``sdpa`` picks on an H100/H200 for a causal
bf16 batch without a mask. It returns the output and an fp32 logsumexp
``[batch, heads, S]``, and the backward saves exactly those (plus q, k, v):
no ``[S, S]`` tensor in either pass.

Registered with transformers as the attention implementation
``"qlora_triton_meta_attention"`` (its mask function returns no mask: the kernel
is causal by itself). Meta tensors only: on real tensors it refuses, so that
it can never stand in for attention that computes values.
"""

from __future__ import annotations

import torch

NAME = "qlora_triton_meta_attention"  # no "flash" in it: transformers would look for a hub kernel


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    # [B, kv_heads, S, D] -> [B, kv_heads * groups, S, D], as transformers' sdpa path does
    # (an allocation the GPU run makes too).
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def meta_flash_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: q, k, v ``[B, heads, S, D]`` -> ``([B, S, heads, D], None)``."""
    if not query.is_meta:
        raise ValueError(f"query: {NAME} only accounts memory on the meta device, got a {query.device} tensor")
    if attention_mask is not None:
        raise ValueError(f"attention_mask: {NAME} is causal without a mask (packed or padded batches "
                         "are not accounted)")
    if dropout:
        raise ValueError(f"dropout: {NAME} accounts dropout-free attention, got {dropout}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                             scale=scaling)[0]
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None


def register() -> str:
    """Register the implementation with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, meta_flash_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


def use_on(model) -> None:
    """Make ``model`` (a transformers model on meta) run :func:`meta_flash_attention`."""
    register()
    model.set_attn_implementation(NAME)
