"""One timed training step, shared by the fine-tune phases and the presets."""

from __future__ import annotations

import time

import torch

from .memory import sync


def timed_step(model: torch.nn.Module, batch: torch.Tensor | dict, optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[torch.Tensor, float]:
    """Forward (language-model loss, labels = inputs; or ``model(**batch)`` for
    a dict of inputs, e.g. a packed batch), backward and optimizer step on
    ``batch``; returns the loss and the step's seconds, measured between
    device syncs so that queued GPU work is counted."""
    sync(device)
    t0 = time.perf_counter()
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch, "labels": batch}
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return loss, time.perf_counter() - t0
