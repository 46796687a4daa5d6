"""Telling FSDP2's sharded tensors (``DTensor``) from plain ones without
importing ``torch.distributed.tensor``, which costs about a second at import
(measured with ``python -X importtime`` on the 2-CPU development machine).
No DTensor can exist before that module is imported, so a process that never
shards never pays for it."""

from __future__ import annotations

import sys
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the tensor),
    else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def like(local_part: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local_part`` (this rank's shard, shaped as ``p``'s) as a DTensor laid out
    like the DTensor ``p``: its mesh, placements, global shape and stride."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_part, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())
