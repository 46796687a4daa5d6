"""``wrap_ddp``: DistributedDataParallel for a QLoRA model, with the frozen
base synced once and no buffer traffic per forward.

DDP's defaults suit models whose buffers change while training (batch-norm
statistics): it broadcasts every buffer from rank 0 at the start of every
forward. A QLoRA model's buffers never change. ``Linear4bit`` keeps its NF4
base as frozen Parameters, which DDP syncs from rank 0 once, at construction,
and never again. The buffers left (rotary frequencies, or a base kept in
buffers by other code: bitsandbytes-style layers, older qlora_triton) would
still be re-sent every forward (a whole 70B base in buffers is about 35 GB
per step). Turning that off with ``broadcast_buffers=False`` also skips DDP's
one sync at construction, so ranks that built different buffers train
silently apart. What is wanted is the sync once, at construction, and never
again: torch >= 2.13 spells that ``forward_sync_buffers=False``; on older
torch the buffers are broadcast from rank 0 here, once, and DDP is built with
``broadcast_buffers=False``."""

from __future__ import annotations

import inspect

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Settings wrap_ddp makes itself: passing them would undo what it is for.
_OWN_SETTINGS = ("broadcast_buffers", "forward_sync_buffers", "init_sync")


def _has_forward_sync_buffers() -> bool:
    return "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that syncs parameters
    and buffers from rank 0 once, now, and sends no buffer bytes in any
    forward. Every rank must call it (DDP's construction is collective).

    ``ddp_kwargs`` are DDP's (``device_ids``, ``process_group``,
    ``find_unused_parameters``, ...) except ``broadcast_buffers``,
    ``forward_sync_buffers`` and ``init_sync``, which this function sets.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    own = sorted(set(ddp_kwargs) & set(_OWN_SETTINGS))
    if own:
        raise ValueError(f"ddp_kwargs: wrap_ddp sets {', '.join(own)} itself (buffers synced once at "
                         "construction, never per forward); call DistributedDataParallel directly for "
                         "other settings")
    if _has_forward_sync_buffers():
        return DistributedDataParallel(model, forward_sync_buffers=False, **ddp_kwargs)
    group = ddp_kwargs.get("process_group")
    for buffer in model.buffers():
        dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return DistributedDataParallel(model, broadcast_buffers=False, **ddp_kwargs)
