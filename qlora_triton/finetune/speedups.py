"""The one place that decides and applies a QLoRA model's speed/memory options:
the fused decoder blocks (``qt.fuse``), Liger-Kernel (:mod:`qlora_triton.liger`)
and offloaded checkpoints (:mod:`qlora_triton.offload`).

Defaults (``None``): fused blocks on where the package has ``qt.fuse``,
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
    fuse: bool = False
    liger: bool = False
    offload: bool = False

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


def fuse_available() -> bool:
    import qlora_triton as qt

    return hasattr(qt, "fuse")


def resolve(fuse: bool | None = None, liger: bool | None = None, offload: bool | None = None) -> Speedups:
    """The options, ``None`` meaning the default; an explicit ``fuse=True`` without ``qt.fuse`` is refused."""
    for name, value in (("fuse", fuse), ("liger", liger), ("offload", offload)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool or None, got {type(value).__name__}")
    if fuse and not fuse_available():
        raise ValueError("fuse: this qlora_triton has no qt.fuse (the fused decoder blocks) yet; use --no-fuse")
    return Speedups(fuse=fuse_available() if fuse is None else fuse,
                    liger=True if liger is None else liger,
                    offload=False if offload is None else offload)


def apply(model: torch.nn.Module, speedups: Speedups, device: torch.device | str | None = None) -> dict:
    """Apply ``speedups`` to a transformers causal LM (gradient checkpointing
    already on, for ``offload``); returns what ran: ``{"fuse": bool, "liger":
    "liger" | "torch" | None, "offload": OffloadStats | None}``."""
    import qlora_triton as qt

    from ..liger import apply_liger
    from ..offload import offload_checkpoints

    if not isinstance(speedups, Speedups):
        raise TypeError(f"speedups: expected a Speedups, got {type(speedups).__name__}")
    done: dict = {"fuse": False, "liger": None, "offload": None}
    if speedups.fuse:
        qt.fuse(model)  # looked up when called: the fused blocks live in another module
        done["fuse"] = True
    if speedups.liger:
        done["liger"] = apply_liger(model, device)
    if speedups.offload:
        done["offload"] = offload_checkpoints(model)
    return done
