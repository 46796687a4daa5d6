"""The one place that decides and applies a QLoRA model's speed/memory options:
the fused decoder blocks (``qt.fuse``), Liger-Kernel (:mod:`qlora_triton.liger`)
and offloaded checkpoints (:mod:`qlora_triton.offload`).

Defaults (``None``): fused blocks where the model allows them (``qt.fuse``
refuses other families and ``lora_dropout > 0``; asked for explicitly, the
refusal is an error),
Liger on (Liger's kernels on CUDA, the chunked-loss torch path elsewhere),
offload off (it trades host traffic for memory: ask for it; the callers that
make the optimizer also give ``PagedAdamW`` ``evict_after_step=True`` with it,
so the Adam states leave the device between steps as well). ``--no-fuse`` /
``--no-liger`` turn the defaults off for comparisons.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Speedups:
    fuse: bool | None = None   # None: where the model allows it
    liger: bool = False
    offload: bool = False

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not False]


def resolve(fuse: bool | None = None, liger: bool | None = None, offload: bool | None = None) -> Speedups:
    """The options, ``None`` meaning the default (fuse: where the model allows it)."""
    for name, value in (("fuse", fuse), ("liger", liger), ("offload", offload)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool or None, got {type(value).__name__}")
    return Speedups(fuse=fuse,
                    liger=True if liger is None else liger,
                    offload=False if offload is None else offload)


def apply(model: torch.nn.Module, speedups: Speedups, device: torch.device | str | None = None) -> dict:
    """Apply ``speedups`` to a transformers causal LM (gradient checkpointing
    already on, for ``offload``); returns what ran: ``{"fuse": bool, "liger":
    "liger" | "torch" | None, "offload": OffloadStats | None}``, plus
    ``"fuse_refused"`` (why) where the default left a model unfused."""
    import qlora_triton as qt

    from ..liger import apply_liger
    from ..offload import offload_checkpoints

    if not isinstance(speedups, Speedups):
        raise TypeError(f"speedups: expected a Speedups, got {type(speedups).__name__}")
    done: dict = {"fuse": False, "liger": None, "offload": None}
    if speedups.fuse is not False:
        try:
            qt.fuse(model)
            done["fuse"] = True
        except ValueError as refusal:  # not a family or setting the fused blocks take
            if speedups.fuse:
                raise
            done["fuse_refused"] = str(refusal)
    if speedups.liger:
        done["liger"] = apply_liger(model, device)
    if speedups.offload:
        done["offload"] = offload_checkpoints(model)
    return done
