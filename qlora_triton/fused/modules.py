"""The ``nn.Module`` side of the fused blocks.

* :class:`FusedLoRAMLP` replaces a gated MLP module; it holds the same
  ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` children, so the
  state dict, the adapters' names and ``save_adapter`` are unchanged.
* q, k and v stay where they are (their names and parameters too): each gets
  the class :class:`FusedLoRALinear4bit` (or :class:`FusedLinear4bit`), whose
  ``forward`` asks the block's :class:`QKVGroup`. The first of the three
  called on a tensor computes all three with one
  :class:`qlora_triton.fused.qkv.LoRAQKVFunction`; the other two, called on
  that very tensor (identity, not equality), take their output from it. Any
  other input runs the group again, so nothing stale is ever returned. The
  attention module itself is not touched, so every family's own attention
  code (RoPE, q/k norms, sliding windows, caches, transformers' attention
  functions) runs as it is.
* The block's output projection (``o_proj``) gets the class
  :class:`FusedSingleLoRALinear4bit`, whose ``forward`` runs
  :class:`qlora_triton.fused.single.LoRASingleFunction` when a gradient can
  flow, and the layer's own forward (with its eval-mode cast cache) when not.

Dtypes follow :class:`qlora_triton.linear.Linear4bit`: the compute dtype of
the first projection (autocast's dtype under autocast), outputs in the
layer's output dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..linear import Linear4bit, LoRALinear4bit
from .mlp import lora_mlp
from .projection import projection
from .qkv import lora_qkv
from .single import lora_single


def _compute(layer: Linear4bit, x: torch.Tensor):
    """``(x in the compute dtype, compute dtype, output dtype, context)`` as the
    layer's own forward decides them."""
    dtype, out_dtype, autocast = layer._dtypes(x)
    ctx = torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
    return (x if x.dtype == dtype else x.to(dtype)), dtype, out_dtype, ctx


class FusedLoRAMLP(nn.Module):
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` as one autograd Function
    (:mod:`qlora_triton.fused.mlp`). Made by :func:`qlora_triton.fuse`; the
    module it replaced is kept for :func:`qlora_triton.unfuse`."""

    def __init__(self, original: nn.Module, act: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj
        self.act_fn = original.act_fn
        self.act = act
        object.__setattr__(self, "_unfused", original)  # not a child: its children are ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, dtype, out_dtype, ctx = _compute(self.gate_proj, x)
        with ctx:
            y = lora_mlp(x, projection(self.gate_proj, dtype), projection(self.up_proj, dtype),
                         projection(self.down_proj, dtype), self.act)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def unfused(self) -> nn.Module:
        """The module this one replaced, holding this one's current children."""
        original = self._unfused
        original.gate_proj, original.up_proj, original.down_proj = self.gate_proj, self.up_proj, self.down_proj
        original.act_fn = self.act_fn
        return original

    def extra_repr(self) -> str:
        return f"act={'silu' if self.act == 0 else 'gelu_tanh'}"


class QKVGroup:
    """The three projections of one attention block and the outputs of the
    last fused call still to be taken (see the module docstring). Not a
    module: the projections stay the attention block's children."""

    def __init__(self, q: Linear4bit, k: Linear4bit, v: Linear4bit) -> None:
        self.members = (q, k, v)
        self._pending: tuple | None = None  # (input, {index: output})

    def output(self, member: Linear4bit, x: torch.Tensor) -> torch.Tensor:
        index = next(i for i, m in enumerate(self.members) if m is member)
        pending = self._pending
        if pending is not None and pending[0] is x and index in pending[1]:
            out = pending[1].pop(index)
            if not pending[1]:
                self._pending = None
            return out
        self._pending = None
        xc, dtype, out_dtype, ctx = _compute(self.members[0], x)
        with ctx:
            outs = lora_qkv(xc, *(projection(m, dtype) for m in self.members))
        outs = [o if o.dtype == out_dtype else o.to(out_dtype) for o in outs]
        self._pending = (x, {i: o for i, o in enumerate(outs) if i != index})
        return outs[index]


class _QKVMember:
    """``forward`` through the block's :class:`QKVGroup` (mixed into our layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv_group.output(self, x)


class FusedLoRALinear4bit(_QKVMember, LoRALinear4bit):
    """A ``LoRALinear4bit`` that is q, k or v of a fused attention block."""


class FusedLinear4bit(_QKVMember, Linear4bit):
    """A ``Linear4bit`` (no adapter) that is q, k or v of a fused attention block."""


FUSED_CLASS = {LoRALinear4bit: FusedLoRALinear4bit, Linear4bit: FusedLinear4bit}


class FusedSingleLoRALinear4bit(LoRALinear4bit):
    """A ``LoRALinear4bit`` that is a fused block's output projection
    (``o_proj``): one :class:`qlora_triton.fused.single.LoRASingleFunction`
    in training; without a gradient to flow, the layer's own forward (whose
    eval-mode cast cache a decode step relies on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad
                                             or self.lora_B.weight.requires_grad
                                             or (self.bias is not None and self.bias.requires_grad))):
            return super().forward(x)
        xc, dtype, out_dtype, ctx = _compute(self, x)
        with ctx:
            y = lora_single(xc, projection(self, dtype))
        return y if y.dtype == out_dtype else y.to(out_dtype)
