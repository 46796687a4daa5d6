"""``Linear4bit`` and ``LoRALinear4bit``: drop-in ``nn.Linear`` modules on a
frozen NF4 weight.

The NF4 tensors are registered as buffers (``weight`` is the packed uint8 data,
shaped ``[(n + 1) // 2, 1]`` as in bitsandbytes; ``weight_absmax``,
``weight_code`` and, with double quantization, ``weight_absmax2``,
``weight_code2``, ``weight_offset``), so ``.to()``, ``.cuda()`` and
``state_dict`` see them. ``.half()`` / ``.to(dtype)`` move them but never
change their dtypes: the codebooks and scales stay float32.

State dicts use bitsandbytes' ``Linear4bit`` keys (``weight``, ``bias``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
``bitsandbytes.nn.Linear4bit`` or a transformers bnb-4bit checkpoint loads
into these modules and theirs loads into bitsandbytes. PEFT's ``base_layer.``
prefix (``q_proj.base_layer.weight`` ...) is accepted on load and never
written: a saved ``LoRALinear4bit`` looks like a bitsandbytes layer plus
``lora_A.weight`` / ``lora_B.weight``, so the base part of a converted model's
state dict is exactly a transformers bnb-4bit checkpoint. A dense ``weight``
(a plain ``nn.Linear`` state dict) is quantized on load.

Compute dtype: under ``torch.autocast`` for the input's device the layer
computes in, and returns, the autocast dtype (as ``nn.Linear`` does).
Otherwise it computes in ``compute_dtype`` (``None``: the input's dtype) and
returns the input's dtype (as bitsandbytes does).

Per call, forward builds nothing that depends only on the weight: the
``NF4Weight`` view of the buffers and the ops' argument tuple are made once and
remade only when a buffer is replaced (``.to()``, ``load_state_dict``,
assignment; checked by identity on every call, so nothing can go stale). In
eval mode the compute-dtype copies of the bias and adapters are kept too (see
``_cast``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import nn

from .library import weight_args
from .lora import lora_nf4_linear_args
from .matmul import nf4_matmul_args
from .quantization import quantize_nf4
from .weight import FLOAT_DTYPES, NF4Weight

# buffer name -> NF4Weight field
_QUANT_BUFFERS = {
    "weight": "packed",
    "weight_absmax": "absmax",
    "weight_code": "code",
    "weight_absmax2": "absmax2",
    "weight_code2": "code2",
    "weight_offset": "offset",
}
_QUANT_NAMES = tuple(_QUANT_BUFFERS)
PEFT_BASE_PREFIX = "base_layer."
# bitsandbytes' keys of a 4-bit weight, after "weight"
_BNB_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def _check_compute_dtype(compute_dtype: Any) -> torch.dtype | None:
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be None or one of {FLOAT_DTYPES}, got {compute_dtype!r}")
    return compute_dtype


def _check_linear(linear: Any) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    if linear.weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"linear.weight must be float32, float16 or bfloat16, got {linear.weight.dtype}")
    return linear


def _quantize_linear(linear: nn.Linear, blocksize: int, double_quant: bool,
                     device: torch.device | str | None) -> tuple[NF4Weight, torch.Tensor | None]:
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if device is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("linear.weight contains NaN or Inf; NF4 cannot represent it")
    return quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant), bias


class Linear4bit(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` a frozen NF4 weight (see the module docstring).

    Args:
        weight: the quantized ``[out_features, in_features]`` weight.
        bias: optional ``[out_features]``; copied into a frozen parameter (set
            ``bias.requires_grad_(True)`` to train it).
        compute_dtype: dtype the matmul runs in; ``None`` means the input's.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        self._set_quant_weight(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if bias.dtype not in FLOAT_DTYPES:  # nf4_matmul takes no other (an int or complex would be cast)
                raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(weight.device).clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> "Linear4bit":
        """Quantize ``linear`` on its device (or on ``device``); ``linear`` is left unchanged."""
        _check_linear(linear)
        _check_compute_dtype(compute_dtype)
        qw, bias = _quantize_linear(linear, blocksize, double_quant, device)
        return cls(qw, bias, compute_dtype=compute_dtype)

    # -- the quantized weight --------------------------------------------------------
    def _set_quant_weight(self, qw: NF4Weight) -> None:
        qw.check_finite()  # once per weight here, so that forward never syncs to check
        for name, field in _QUANT_BUFFERS.items():
            t = getattr(qw, field)
            self.register_buffer(name, t.reshape(-1, 1) if name == "weight" else t)
        # Static facts, kept as Python values so forward reads no tensor data.
        self._qshape, self._qdtype = qw.shape, qw.dtype
        self._blocksize, self._blocksize2 = qw.blocksize, qw.blocksize2
        self._build_weight()

    def _build_weight(self) -> tuple[NF4Weight, tuple]:
        buffers = tuple(map(self._buffers.get, _QUANT_NAMES))
        qw = NF4Weight(packed=self.weight, absmax=self.weight_absmax, shape=self._qshape,
                       dtype=self._qdtype, blocksize=self._blocksize, code=self.weight_code,
                       absmax2=self.weight_absmax2, code2=self.weight_code2,
                       offset=self.weight_offset, blocksize2=self._blocksize2)
        # (buffers it was built from, the weight, the ops' arguments)
        self._weight_cache = (buffers, qw, weight_args(qw))
        self._casts: dict[str, tuple] = {}
        return qw, self._weight_cache[2]

    def _weight(self) -> tuple[NF4Weight, tuple]:
        """``(quant_weight, weight_args(quant_weight))``, rebuilt only when a
        buffer is no longer the tensor it was built from."""
        built, qw, args = self._weight_cache
        if all(map(operator.is_, built, map(self._buffers.get, _QUANT_NAMES))):
            return qw, args
        return self._build_weight()

    @property
    def quant_weight(self) -> NF4Weight:
        """An ``NF4Weight`` view of the buffers (no copy, no device sync)."""
        return self._weight()[0]

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda() move the NF4 buffers, but undo any dtype change
        # (.half() would otherwise round the fp32 codebooks and scales).
        before = {n: self._buffers[n] for n in _QUANT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._build_weight()
        return self

    def train(self, mode: bool = True) -> "Linear4bit":
        self._casts = {}  # a mode switch is when adapters change without autograd seeing it
        return super().train(mode)

    # -- forward ---------------------------------------------------------------------
    def _dtypes(self, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype, bool]:
        """``(compute dtype, output dtype, autocast on)`` for input ``x``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        device_type = x.device.type
        # (meta tensors have no autocast)
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            return dtype, dtype, True
        return self.compute_dtype or x.dtype, x.dtype, False

    def _cast(self, name: str, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``t`` (a parameter: the bias, an adapter) in ``dtype``. In eval mode,
        when no gradient flows to ``t``, its cast copy is kept and reused while
        ``t`` is the same tensor at the same version, storage and dtype, so a
        decode step does not pay a cast per parameter. Optimizer steps,
        ``load_state_dict``, ``copy_`` under ``no_grad``, ``.to()`` and
        ``train()``/``eval()`` all renew it; an edit through ``t.data``, which
        autograd does not see either, is seen after the next ``eval()``."""
        if t is None or t.dtype == dtype:
            return t
        if self.training or (t.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return t.to(dtype)
        key = (t._version, t.data_ptr(), t.dtype, t.device, dtype)
        hit = self._casts.get(name)
        if hit is not None and hit[0] is t and hit[1] == key:
            return hit[2]
        with torch.inference_mode(False):  # usable outside inference_mode too
            copy = t.detach().to(dtype)
        self._casts[name] = (t, key, copy)
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, out_dtype, autocast = self._dtypes(x)
        x = x if x.dtype == dtype else x.to(dtype)
        if autocast:  # our dtypes are explicit: autocast must not recast inside
            with torch.autocast(x.device.type, enabled=False):
                y = self._forward(x, dtype)
        else:
            y = self._forward(x, dtype)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return nf4_matmul_args(x, self._weight()[1], self._cast("bias", self.bias, dtype))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight (for merging and export, never in forward)."""
        from .quantization import dequantize_nf4
        return dequantize_nf4(self.quant_weight, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self._blocksize}, "
                f"double_quant={self.weight_absmax.dtype == torch.uint8}, compute_dtype={self.compute_dtype}")

    # -- state dict in bitsandbytes' keys ----------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.quant_weight.state_dict(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # PEFT writes the base layer under "base_layer."; rename in place so the
        # children (lora_A, lora_B) see a consistent dict too.
        peft = prefix + PEFT_BASE_PREFIX
        for key in [k for k in state_dict if k.startswith(peft)]:
            state_dict[prefix + key[len(peft):]] = state_dict.pop(key)
        handled: set[str] = set()

        wkey = prefix + "weight"
        if wkey in state_dict:
            qkeys = {wkey + suffix for suffix in _BNB_WEIGHT_KEYS if wkey + suffix in state_dict}
            handled |= qkeys
            try:
                qw = self._weight_from_state_dict({k[len(prefix):]: state_dict[k] for k in qkeys})
            except (KeyError, TypeError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}")
            else:
                if tuple(qw.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{wkey}: shape {tuple(qw.shape)} does not match this layer's "
                                      f"({self.out_features}, {self.in_features})")
                else:
                    self._set_quant_weight(qw.to(self.weight.device))
        elif strict:
            missing_keys.append(wkey)

        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey in state_dict:
                handled.add(bkey)
                bias = state_dict[bkey]
                if bias.shape != self.bias.shape:
                    error_msgs.append(f"{bkey}: shape {tuple(bias.shape)} does not match {tuple(self.bias.shape)}")
                else:
                    with torch.no_grad():
                        self.bias.copy_(bias)
            elif strict:
                missing_keys.append(bkey)

        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in handled:
                    head = key[len(prefix):].split(".", 1)[0]
                    if head not in self._modules:
                        unexpected_keys.append(key)

    def _weight_from_state_dict(self, sd: dict[str, torch.Tensor]) -> NF4Weight:
        weight = sd["weight"]
        if weight.dtype in FLOAT_DTYPES and len(sd) == 1:
            # A dense nn.Linear checkpoint: quantize it like this layer's weight.
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"dense shape {tuple(weight.shape)} does not match this layer's "
                                 f"({self.out_features}, {self.in_features})")
            return quantize_nf4(weight.to(self.weight.device), blocksize=self._blocksize,
                                double_quant=self.weight_absmax.dtype == torch.uint8)
        return NF4Weight.from_state_dict(sd, "weight")


def check_lora_args(r: Any, lora_alpha: Any, lora_dropout: Any, use_rslora: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) \
            or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")


class LoRALinear4bit(Linear4bit):
    """``y = x @ W.T + bias + s * (dropout(x) @ A.T) @ B.T`` with ``W`` a frozen
    NF4 weight, trained through one fused autograd Function
    (:class:`qlora_triton.lora.LoRANF4Function`).

    ``lora_A`` is ``nn.Linear(in, r, bias=False)`` (kaiming-uniform, a=sqrt(5),
    as nn.Linear and PEFT), ``lora_B`` is ``nn.Linear(r, out, bias=False)``
    (zeros, so the layer starts equal to its base). ``s = lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``. The adapters are kept in
    ``lora_dtype`` (float32 by default) and cast to the compute dtype in forward.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: torch.dtype | None = None,
                 lora_dtype: torch.dtype = torch.float32) -> None:
        check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
        if lora_dtype not in FLOAT_DTYPES:
            raise TypeError(f"lora_dtype must be one of {FLOAT_DTYPES}, got {lora_dtype!r}")
        super().__init__(weight, bias, compute_dtype)
        self.r, self.lora_alpha = r, lora_alpha
        self.lora_dropout, self.use_rslora = float(lora_dropout), use_rslora
        factory = dict(device=weight.device, dtype=lora_dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0, use_rslora: bool = False, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None,
                    lora_dtype: torch.dtype = torch.float32) -> "LoRALinear4bit":
        """Quantize ``linear`` on its device (or on ``device``) and add fresh adapters."""
        _check_linear(linear)
        check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
        _check_compute_dtype(compute_dtype)
        qw, bias = _quantize_linear(linear, blocksize, double_quant, device)
        return cls(qw, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, compute_dtype=compute_dtype, lora_dtype=lora_dtype)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        return lora_nf4_linear_args(x, self._weight()[1], self._cast("bias", self.bias, dtype),
                                    self._cast("lora_A", self.lora_A.weight, dtype),
                                    self._cast("lora_B", self.lora_B.weight, dtype), self.scaling, p)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # PEFT keeps adapters per name ("lora_A.default.weight"); one named
        # adapter is accepted as ours.
        for part in ("lora_A", "lora_B"):
            ours = f"{prefix}{part}.weight"
            named = [k for k in state_dict if k.startswith(f"{prefix}{part}.") and k != ours
                     and k.endswith(".weight") and k.count(".") == ours.count(".") + 1]
            if ours not in state_dict and len(named) == 1:
                state_dict[ours] = state_dict.pop(named[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``W + s * B @ A`` (computed in float32), in ``dtype`` (default: the base's)."""
        w = self.dequantized_weight(torch.float32)
        w.addmm_(self.lora_B.weight.detach().float(), self.lora_A.weight.detach().float(),
                 alpha=self.scaling)
        return w.to(dtype or self._qdtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}")
