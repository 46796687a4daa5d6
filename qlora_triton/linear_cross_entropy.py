"""Cross-entropy of a linear head, chunked over tokens: never the whole
``[tokens, vocab]`` fp32 logits.

The plain-torch analogue of Liger-Kernel's FusedLinearCrossEntropy, used where
Liger cannot run (the CPU, the meta device of the memory accounting; see
:func:`qlora_triton.backend.use_liger`). A causal LM's loss otherwise holds
the bf16 logits, their fp32 copy, the log-softmax and, in the backward, its
gradient: four ``[tokens, vocab]`` tensors (about 1 GiB at 2048 tokens and a
32000 vocab). Here the forward walks the tokens in chunks and, for each,
computes the fp32 logits, their logsumexp, the loss terms and at once the
gradients; only the chunk's logits are alive at a time, and the backward just
scales the saved gradients.

Math, per token t with target y (ignored tokens contribute nothing),
``z = h_t W^T`` in fp32, ``p = softmax(z)``, divisor D (the number of
non-ignored tokens, or the ``num_items_in_batch`` transformers passes)::

    loss = sum_t (logsumexp(z_t) - z_t[y_t]) / D
    dloss/dh_t = (p_t - onehot(y_t)) W / D          # [hidden]
    dloss/dW   = sum_t (p_t - onehot(y_t))^T h_t / D  # only if W requires grad

The chunk length follows Liger's rule of thumb (tokens / ceil(vocab /
hidden), rounded up to a power of two): a chunk's logits are about as large
as the hidden states.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: about ``tokens * hidden / vocab``, a power of two, at least 1."""
    rows = max(1, math.ceil(tokens / max(1, math.ceil(vocab / hidden))))
    return 1 << (rows - 1).bit_length()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, ignore_index):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        rows = chunk_rows(tokens, vocab, hidden.shape[1])
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.t()).float()  # [rows, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != ignore_index
            safe = torch.where(valid, t, torch.zeros_like(t))
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if want_h or want_w:
                # softmax in place of the logits, minus the one-hot, masked and divided
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
                probs.mul_((valid.float() / divisor)[:, None])
                probs = probs.to(hidden.dtype)
                if want_h:
                    grad_h[start:start + rows] = probs @ weight
                if want_w:
                    grad_w.add_((probs.t() @ h).float())
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         divisor: torch.Tensor | float | None = None,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` summed over tokens and divided
    by ``divisor`` (default: the number of targets that are not ``ignore_index``,
    i.e. the mean), without the whole logits.

    hidden: ``[tokens, H]`` float; weight: ``[V, H]`` of hidden's dtype; targets:
    ``[tokens]`` int64."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden: expected a 2-D float tensor [tokens, hidden], got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [vocab, {hidden.shape[1]}], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets: expected int64 [{hidden.shape[0]}], got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {getattr(targets, 'shape', '')}")
    if divisor is None:
        divisor = (targets != ignore_index).sum()
    divisor = torch.as_tensor(divisor, device=hidden.device).float()
    return _LinearCrossEntropy.apply(hidden, weight, targets.to(hidden.device), divisor, ignore_index)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None,
                   num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``: the next token's label,
    mean over non-ignored tokens, or sum / ``num_items_in_batch``) for hidden states
    ``[B, S, H]`` and the head's ``weight``, through :func:`linear_cross_entropy`."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels: give labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: shape {tuple(shift_labels.shape)} does not match the hidden states' "
                         f"{tuple(hidden.shape[:-1])}")
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                shift_labels.reshape(-1).to(torch.int64), num_items_in_batch, ignore_index)
