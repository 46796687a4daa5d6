"""Paged AdamW optimizers: ``PagedAdamW`` (fp32 moments) and ``PagedAdamW8bit``
(blockwise 8-bit moments, bitsandbytes' 8-bit optimizer format).

Both apply ``torch.optim.AdamW``'s update (decoupled weight decay, bias
correction) with one fused kernel launch per parameter (ops/optimizer.py; the
plain-torch reference on the torch backend). On CUDA with ``paged=True`` the
states live in CUDA unified memory (qlora_triton/paged.py): before an update the
states are prefetched to the device; with ``evict_after_step=True`` they are
evicted to host memory after it, so forward/backward get that device memory
back. :meth:`prefetch` / :meth:`evict` page by hand, and
:meth:`device_resident_bytes` reports what the optimizer holds on the device.

State layout (``optimizer.state[p]`` and ``state_dict()["state"][i]``):

* ``PagedAdamW``: ``step`` (fp32 scalar tensor on the CPU), ``exp_avg`` and
  ``exp_avg_sq`` (fp32, the parameter's shape): torch.optim.AdamW's layout, so
  state dicts load either way (torch casts the moments to a bf16/fp16
  parameter's dtype; here they stay fp32 whatever the parameter dtype).
* ``PagedAdamW8bit``: ``step``; ``exp_avg_codes`` / ``exp_avg_sq_codes``
  (uint8, the parameter's shape) index the signed / unsigned 8-bit dynamic
  maps (``qt.dynamic_map(signed=...)``); ``exp_avg_absmax`` /
  ``exp_avg_sq_absmax`` (fp32 ``[ceil(numel / 256)]``) scale each block of 256
  consecutive elements. ``state_dict()`` adds ``exp_avg`` / ``exp_avg_sq``
  dequantized to fp32, so torch.optim.AdamW (or PagedAdamW) can load it;
  ``load_state_dict`` takes the codes when present (exact continuation) and
  otherwise quantizes ``exp_avg`` / ``exp_avg_sq``. A parameter with fewer
  than ``min_8bit_size`` (default 4096) elements has PagedAdamW's fp32 layout.

Which parameters are updated: those with ``requires_grad=True`` and a
``.grad``. Frozen parameters (``requires_grad=False``) of any dtype, such as a
model's NF4 base or embeddings, may be passed (``model.parameters()`` is
fine): they are kept in their group, as torch.optim.AdamW does, but never
updated and never given state. A trainable parameter must be float32,
bfloat16 or float16 (else a ``TypeError``).

Sharded parameters (FSDP2's ``fully_shard``: ``DTensor`` parameters and
gradients): each rank updates its own shard (``p.to_local()``) with moments of
the shard's shape (paged as above), so the optimizer state is sharded like the
parameters and no communication happens in ``step``. ``state_dict()`` gives
each moment as a ``DTensor`` of the parameter's full shape, mesh and
placements, so torch.distributed.checkpoint (``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, full or sharded) saves and loads it;
``load_state_dict`` takes a moment as such a ``DTensor`` or as a full tensor
(its shard is taken). For 8-bit states of a sharded parameter the state dict
carries only the fp32 ``exp_avg`` / ``exp_avg_sq`` (each rank's absmax blocks
cover its own shard, which no full tensor describes); loading re-quantizes
them, so that continuation matches to 8-bit rounding, not bitwise.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from . import paged as _paged
from . import reference
from .adamw_scalars import STATE_BLOCKSIZE as QBLOCK
from .adamw_scalars import AdamWScalars
from .backend import use_triton
from .codebooks import dynamic_map
from .dtensor import is_dtensor, like
from .dtensor import local as local_shard
from .quantization import dequantize_blockwise_8bit, quantize_blockwise_8bit

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    def number(name: str, x: Any) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(x).__name__}")
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
        return float(x)

    if number("lr", lr) < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if number("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class _PagedAdamWBase(torch.optim.Optimizer):
    """AdamW with states in CUDA unified memory: the step loop and the paging;
    subclasses choose the state format."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 paged: bool = True, evict_after_step: bool = False):
        _check_hyper(lr, betas, eps, weight_decay)
        for name, flag in (("paged", paged), ("evict_after_step", evict_after_step)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.paged = paged
        self.evict_after_step = evict_after_step
        # "device" / "host" for each parameter whose states are in managed
        # memory: where the last prefetch / evict put them.
        self._placement: dict[torch.Tensor, str] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # -- parameter groups ------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not (isinstance(p, torch.Tensor) and p.requires_grad):
                continue  # frozen: never updated (torch rejects a non-tensor)
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"trainable params must be float32, bfloat16 or float16 tensors, got one of "
                                f"{p.dtype} (freeze it with requires_grad_(False) to pass it along)")
            if self._is_paged(p):
                _paged.helper()  # fail now, saying how to build it, not at the first step
        # The list, not the caller's (possibly exhausted) generator.
        super().add_param_group({**param_group, "params": params})

    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.paged and local_shard(p).device.type == "cuda"

    # -- states ----------------------------------------------------------------

    def _alloc(self, p: torch.Tensor, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
        if self._is_paged(p):
            return _paged.managed_empty(shape, dtype, local_shard(p).device)
        return torch.empty(tuple(shape), dtype=dtype, device=local_shard(p).device)

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh states of ``p`` (zero moments, the shape of p's local shard),
        written on p's device so that managed pages start out resident there."""
        raise NotImplementedError

    def _load_moments(self, p: torch.Tensor, state: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
        raise NotImplementedError

    def _moments(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [t for k, t in state.items() if k != "step"]

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self._new_state(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # as torch.optim.AdamW, on the CPU
        return state

    # -- paging ------------------------------------------------------------------

    def _page(self, params: Iterable[torch.Tensor], to: str) -> None:
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        moved = []
        for p in params:
            if self._placement.get(p, to) != to:
                by_device[p.device] += self._moments(self.state[p])
                moved.append(p)
        for tensors in by_device.values():
            if to == "device":
                _paged.prefetch_to_device(tensors)
            else:
                _paged.evict_to_host(tensors)
        for p in moved:
            self._placement[p] = to

    def prefetch(self) -> None:
        """Bring every paged state to its device (checked against free device
        memory; ordered on the current stream). ``step`` does it by itself."""
        self._page(list(self._placement), "device")

    def evict(self) -> None:
        """Move every paged state to host memory (ordered on the current stream)
        until the next prefetch or step. On the H200 the driver's free-memory
        figure did not rise when the pages left (docs/optimizers.md)."""
        self._page(list(self._placement), "host")

    def device_resident_bytes(self) -> int:
        """Bytes of optimizer state on a CUDA device: paged states the last
        prefetch / evict left there plus every non-paged CUDA state."""
        total = 0
        for p, state in self.state.items():
            if self._placement.get(p, "device") == "device":
                total += sum(t.nbytes for t in self._moments(state) if t.device.type == "cuda")
        return total

    # -- the update ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                if is_dtensor(p) != is_dtensor(grad) or (
                        is_dtensor(p) and grad.placements != p.placements):
                    raise TypeError("grad must be sharded like its parameter: got "
                                    f"{getattr(grad, 'placements', 'a plain tensor')} for "
                                    f"{getattr(p, 'placements', 'a plain tensor')}")
                local, grad = local_shard(p), local_shard(grad)
                if grad.dtype != p.dtype or grad.shape != local.shape or grad.device != local.device:
                    raise TypeError(f"grad must match its parameter: got {grad.dtype} {tuple(grad.shape)} on "
                                    f"{grad.device} for a {p.dtype} {tuple(local.shape)} parameter on "
                                    f"{local.device}")
                if not self.state[p]:
                    self.state[p].update(self._init_state(p))
                    if self._is_paged(p):
                        self._placement[p] = "device"
                work.append((p, group))
        self._page([p for p, _ in work], "device")
        for p, group in work:
            state = self.state[p]
            state["step"] += 1
            beta1, beta2 = group["betas"]
            scalars = AdamWScalars(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                   weight_decay=group["weight_decay"], step=state["step"].item())
            local = local_shard(p)
            if local.numel() == 0:  # an empty shard (FSDP2 pads uneven splits)
                continue
            target = local if local.is_contiguous() else local.contiguous()
            if use_triton(local.device):
                from .ops.optimizer import adamw_step
            else:
                adamw_step = reference.adamw_step
            adamw_step(target, local_shard(p.grad).contiguous(), scalars=scalars, **self._kernel_states(state),
                       **self._step_flags(local.device, state))
            if target is not local:
                local.copy_(target)
        self._after_step()
        if self.evict_after_step:
            self._page([p for p, _ in work], "host")
        return loss

    def _step_flags(self, device: torch.device, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra arguments of the step functions for ``state`` (none here)."""
        return {}

    def _after_step(self) -> None:
        """Called at the end of every ``step`` (nothing here)."""

    def _kernel_states(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state arguments of the step functions (ops.optimizer / reference ``adamw_step``)."""
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        sd["state"] = {i: self._saved_state(params[i], state) for i, state in sd["state"].items()}
        return sd

    def _saved_state(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` as ``state_dict()`` gives it: a sharded parameter's moments as DTensors."""
        if not is_dtensor(p):
            return state
        return {k: t if k == "step" else like(t, p) for k, t in state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class, of the other paged class, or of
        torch.optim.AdamW; states are copied into fresh (managed, when paged)
        tensors in this optimizer's format."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (an optimizer's "
                             "state_dict()), got " + (f"keys {sorted(state_dict)}" if isinstance(state_dict, dict)
                                                      else type(state_dict).__name__))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(self.param_groups)}")
        by_index: dict[int, torch.Tensor] = {}
        groups = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"parameter group {i} has {len(group['params'])} parameters, "
                                 f"the state_dict's has {len(saved['params'])}")
            for flag in ("amsgrad", "maximize"):
                if saved.get(flag):
                    raise ValueError(f"state_dict's parameter group {i} has {flag}=True, which PagedAdamW does "
                                     "not implement")
            merged = {**saved, "params": group["params"]}
            _check_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
            groups.append(merged)
            by_index.update(zip(saved["params"], group["params"]))
        states: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        placement = {}
        for index, saved in state_dict["state"].items():
            if index not in by_index:
                raise ValueError(f"state_dict has state for parameter {index}, which no parameter group holds")
            p = by_index[index]
            state = self._init_state(p)
            step = saved.get("step") if isinstance(saved, dict) else None
            if step is None:
                raise ValueError(f"state_dict's state for parameter {index} lacks 'step'")
            step = float(step)
            if not (math.isfinite(step) and step >= 0):
                raise ValueError(f"state_dict's state for parameter {index}: step must be a finite count "
                                 f">= 0, got {step}")
            state["step"] = torch.tensor(step, dtype=torch.float32)
            self._load_moments(p, state, saved)
            states[p] = state
            if self._is_paged(p):
                placement[p] = "device"
        self.state, self.param_groups, self._placement = states, groups, placement


def _check_saved(name: str, saved: dict[str, Any], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    if name not in saved:
        raise ValueError(f"state_dict entry lacks {name!r}")
    t = saved[name]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"state_dict's {name!r} must be a tensor of shape {tuple(shape)}, got {got}")
    return t


def _saved_moment(name: str, saved: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
    """A saved tensor of p's shape, as the part of it that p's local shard holds:
    a DTensor's own shard, or this rank's shard of a full tensor."""
    t = _check_saved(name, saved, p.shape)
    if not is_dtensor(p):  # a sharded run's DTensor into an unsharded parameter: gather it
        return t.full_tensor() if is_dtensor(t) else t
    if is_dtensor(t):
        if t.placements != p.placements:
            t = t.redistribute(placements=p.placements)
        return t.to_local()
    from torch.distributed.tensor import distribute_tensor

    # Every rank holds the full tensor: take this rank's shard without communicating.
    return distribute_tensor(t.to(local_shard(p).device), p.device_mesh, p.placements, src_data_rank=None).to_local()


_FP32_MOMENTS = ("exp_avg", "exp_avg_sq")


class PagedAdamW(_PagedAdamWBase):
    """AdamW (torch.optim.AdamW's math) with fp32 moments in CUDA unified memory.

    Args:
        params: parameters or parameter groups; the trainable ones fp32, bf16 or
            fp16, frozen ones of any dtype (kept, never updated: ``model.parameters()``
            is fine). FSDP2-sharded (DTensor) parameters update their local shard.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        paged: on CUDA, keep the states in managed memory (needs the helper built
            with ``QLORA_TRITON_BUILD_CUDA=1``); ignored on the CPU.
        evict_after_step: evict the states to host memory after every step.
    """

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self._alloc(p, local_shard(p).shape, torch.float32).zero_() for k in _FP32_MOMENTS}

    def _kernel_states(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: state[k] for k in _FP32_MOMENTS}

    def _load_moments(self, p: torch.Tensor, state: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
        for key in _FP32_MOMENTS:
            state[key].copy_(_saved_moment(key, saved, p))


class PagedAdamW8bit(PagedAdamW):
    """AdamW with blockwise 8-bit moments (dynamic maps, 256 elements per fp32
    absmax, as bitsandbytes' 8-bit optimizers) in CUDA unified memory: 2 bytes
    per parameter of state (+ 1/32) instead of 8. The update itself runs in fp32
    on the dequantized moments, which are then requantized in the same kernel.

    Arguments as :class:`PagedAdamW`, plus ``min_8bit_size``: parameters with
    fewer elements keep fp32 moments, exactly as :class:`PagedAdamW` (as
    bitsandbytes' 8-bit optimizers, whose default is also 4096): on a small
    tensor, 8-bit state saves little memory and costs the most accuracy.
    """

    _SIGNED = {"exp_avg": True, "exp_avg_sq": False}

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 paged: bool = True, evict_after_step: bool = False, min_8bit_size: int = 4096):
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        # Non-finite moments stored as 0 (see _after_step): one int32 flag per
        # device that the step kernels set, its host copies still in flight
        # (CUDA: a non-blocking copy and its event), and whether we warned.
        self._nonfinite_flags: dict[torch.device, torch.Tensor] = {}
        self._nonfinite_pending: list[tuple[Any, torch.Tensor]] = []
        self._warned_nonfinite = False
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, paged=paged,
                         evict_after_step=evict_after_step)

    def _step_flags(self, device: torch.device, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "exp_avg" in state:  # fp32 moments (under min_8bit_size): NaN stays NaN, as in torch
            return {}
        flag = self._nonfinite_flags.get(device)
        if flag is None:
            flag = self._nonfinite_flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return {"nonfinite": flag}

    def _after_step(self) -> None:
        """Warn once per optimizer when a step stored a non-finite moment element
        as 0. Never waits for the device: a CUDA flag is copied to the host
        without blocking and read by a later ``step`` once its copy is done."""
        if self._warned_nonfinite or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # (no host copies or event queries inside a CUDA graph capture)
        for flag in self._nonfinite_flags.values():
            if flag.device.type == "cuda":
                host = torch.empty(1, dtype=torch.int32, pin_memory=True)
                host.copy_(flag, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(flag.device))
                self._nonfinite_pending.append((done, host))
            else:
                self._nonfinite_pending.append((None, flag))
        pending, seen = [], False
        for done, host in self._nonfinite_pending:
            if done is not None and not done.query():
                pending.append((done, host))
            elif int(host[0]):
                seen = True
        self._nonfinite_pending = pending
        if seen:
            self._warned_nonfinite = True
            self._nonfinite_pending = []
            warnings.warn(
                "PagedAdamW8bit: a moment element became NaN or Inf (a NaN or Inf gradient, or one so "
                "large that its second moment overflows float32) and was stored as 0, since 8 bits hold no NaN; "
                "the rest of its 256-element block is unaffected. A NaN or Inf gradient also made "
                "its parameter element NaN, as in torch.optim.AdamW. This warning is given once "
                "per optimizer.", RuntimeWarning, stacklevel=3)

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        # The full parameter's size decides, so every rank (and one process) agrees.
        if p.numel() < self.min_8bit_size:  # fp32 moments; the other methods read the state's keys
            return super()._new_state(p)
        local = local_shard(p)
        nblocks = -(-local.numel() // QBLOCK)
        state = {}
        for moment, signed in self._SIGNED.items():
            zero_code = int((dynamic_map(signed=signed) == 0).nonzero()[0])  # 127 signed, 0 unsigned
            state[f"{moment}_codes"] = self._alloc(p, local.shape, torch.uint8).fill_(zero_code)
            state[f"{moment}_absmax"] = self._alloc(p, (nblocks,), torch.float32).zero_()
        return state

    def _kernel_states(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "exp_avg" in state:  # a parameter under min_8bit_size
            return super()._kernel_states(state)
        return dict(exp_avg=state["exp_avg_codes"], exp_avg_sq=state["exp_avg_sq_codes"],
                    exp_avg_absmax=state["exp_avg_absmax"], exp_avg_sq_absmax=state["exp_avg_sq_absmax"])

    def _load_moments(self, p: torch.Tensor, state: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
        if "exp_avg" in state:  # under min_8bit_size; a state_dict always has the fp32 moments
            return super()._load_moments(p, state, saved)
        local = local_shard(p)
        nblocks = -(-local.numel() // QBLOCK)
        for moment, signed in self._SIGNED.items():
            if f"{moment}_codes" in saved and not is_dtensor(p):
                codes = _check_saved(f"{moment}_codes", saved, p.shape)
                absmax = _check_saved(f"{moment}_absmax", saved, (nblocks,))
                if codes.dtype != torch.uint8:
                    raise TypeError(f"state_dict's {moment}_codes must be uint8, got {codes.dtype}")
            elif local.numel() == 0:
                continue
            else:
                x = _saved_moment(moment, saved, p).to(device=local.device, dtype=torch.float32)
                codes, absmax = quantize_blockwise_8bit(x, dynamic_map(local.device, signed=signed), QBLOCK)
            state[f"{moment}_codes"].copy_(codes.reshape(local.shape))
            state[f"{moment}_absmax"].copy_(absmax)

    def dequantized_moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of ``p`` as fp32 tensors of the shape of
        p's local shard (p's shape when it is not sharded)."""
        state, local = self.state[p], local_shard(p)
        if "exp_avg" in state:
            return state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        if local.numel() == 0:
            return torch.zeros_like(local, dtype=torch.float32), torch.zeros_like(local, dtype=torch.float32)
        return tuple(
            dequantize_blockwise_8bit(state[f"{m}_codes"], state[f"{m}_absmax"],
                                      dynamic_map(local.device, signed=signed), QBLOCK).reshape(local.shape)
            for m, signed in self._SIGNED.items())

    def _saved_state(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        if "exp_avg" not in state:  # 8-bit: add the fp32 moments
            exp_avg, exp_avg_sq = self.dequantized_moments(p)
            state = {**state, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            if is_dtensor(p):  # see the module docstring
                state = {k: state[k] for k in ("step", "exp_avg", "exp_avg_sq")}
        return super()._saved_state(p, state)
