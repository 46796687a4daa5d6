"""``Linear4bit`` and ``LoRALinear4bit``: drop-in ``nn.Linear`` modules on a
frozen NF4 weight.

Storage. The NF4 tensors are frozen Parameters (``requires_grad=False``), one
per bitsandbytes tensor, each in a non-float storage dtype: ``weight`` is the
packed uint8 data, shaped ``[(n + 1) // 2, 1]`` as in bitsandbytes;
``weight_absmax`` is uint8 (double quantization) or the int32 bit pattern of
the float32 scales; ``weight_code`` and, with double quantization,
``weight_absmax2``, ``weight_code2`` and ``weight_offset`` (shape ``[1]``) are
int32 bit patterns of float32 tensors. Why Parameters: FSDP2
(``torch.distributed.fsdp.fully_shard``) shards Parameters only, so the NF4
base is split across ranks (each tensor on dim 0) and all-gathered bit for bit
in forward; buffers would stay whole on every rank. Why non-float: nothing
that casts float parameters touches them (FSDP2's ``MixedPrecisionPolicy``
casts every float parameter, frozen or not; ``.half()``, ``.to(dtype)`` and
PEFT's kbit preparation cast float parameters), and no float dtype ever holds
packed bytes (a bf16 store can rewrite NaN bit patterns). One Parameter per
bitsandbytes tensor, not one flat byte Parameter per layer, so that a sharded
state dict still holds bitsandbytes' keys, each a ``Shard(0)`` DTensor (the
float32 ones as ``DTensor.view(torch.float32)`` of the int32 storage), and
``get_model_state_dict(..., full_state_dict=True)`` gathers exactly
bitsandbytes' tensors; the ``quant_state`` JSON is made from static facts kept
as Python values (shape, blocksize, the nested offset), so it needs no
collective. The kernels are unchanged: forward builds the ``NF4Weight`` view of
the tensors FSDP2 has just all-gathered.

``parameters()`` therefore includes the frozen NF4 pieces (as bitsandbytes'
``Params4bit`` does); :meth:`Linear4bit.nf4_parameters` names them.

Outside a forward (``quant_weight``, ``dequantized_weight``,
``merged_weight``, merging, export) a sharded layer raises a ``RuntimeError``
saying to unshard it first (``qlora_triton.distributed.unsharded(model)``, or
``unshard()`` on the FSDP module that holds the layer): gathering is a
collective that every rank must enter, so a layer never does it on its own.

State dicts use bitsandbytes' ``Linear4bit`` keys (``weight``, ``bias``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
``bitsandbytes.nn.Linear4bit`` or a transformers bnb-4bit checkpoint loads
into these modules and theirs loads into bitsandbytes. PEFT's ``base_layer.``
prefix (``q_proj.base_layer.weight`` ...) is accepted on load and never
written: a saved ``LoRALinear4bit`` looks like a bitsandbytes layer plus
``lora_A.weight`` / ``lora_B.weight``, so the base part of a converted model's
state dict is exactly a transformers bnb-4bit checkpoint. A dense ``weight``
(a plain ``nn.Linear`` state dict) is quantized on load. A sharded layer
loads in place into its shards, from full tensors (each rank keeps its rows)
or from DTensors sharded as its own (a sharded state dict, DCP); the format
(shape, blocksize, double quantization) must then be the layer's. Values read
whole (a full state dict) are checked as in one process; from DTensors each
rank checks the float32 pieces of its shards for NaN and Inf.
``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``set_model_state_dict``) works with and without FSDP2; its
``ignore_frozen_params`` option does not (it looks the frozen parameters' own
names up among the state-dict keys).

Compute dtype: under ``torch.autocast`` for the input's device the layer
computes in, and returns, the autocast dtype (as ``nn.Linear`` does).
Otherwise it computes in ``compute_dtype`` (``None``: the input's dtype) and
returns the input's dtype (as bitsandbytes does).

Per call, forward builds nothing that depends only on the weight: the
``NF4Weight`` view of the parameters and the ops' argument tuple are made once
and remade when a parameter is replaced or its data moves (``.to()``,
``load_state_dict``, assignment, ``param.data = ...``, FSDP2's all-gather into
freshly allocated storage; checked by identity and data pointer on every call,
so nothing can go stale). In eval mode the compute-dtype copies of the bias
and adapters are kept too (see ``_cast``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import nn

from .dtensor import is_dtensor
from .library import weight_args
from .lora import lora_nf4_linear_args
from .matmul import nf4_matmul_args
from .quantization import quantize_nf4
from .weight import FLOAT_DTYPES, NF4Weight, parse_quant_state, quant_state_blob

# parameter name -> NF4Weight field
_QUANT_PARAMS = {
    "weight": "packed",
    "weight_absmax": "absmax",
    "weight_code": "code",
    "weight_absmax2": "absmax2",
    "weight_code2": "code2",
    "weight_offset": "offset",
}
_QUANT_NAMES = tuple(_QUANT_PARAMS)
# NF4Weight field -> bitsandbytes' key after "weight" (the offset lives in the quant_state JSON)
_BNB_KEY = {"packed": "", "absmax": ".absmax", "code": ".quant_map", "absmax2": ".nested_absmax",
            "code2": ".nested_quant_map"}
PEFT_BASE_PREFIX = "base_layer."
# bitsandbytes' keys of a 4-bit weight, after "weight"
_BNB_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_QUANT_STATE_KEY = ".quant_state.bitsandbytes__nf4"
SHARDED_HINT = ("its NF4 weight is sharded by FSDP2 (fully_shard); unshard it first, on every rank: "
                "`with qlora_triton.distributed.unsharded(model): ...` (or call unshard() on the "
                "FSDP module that holds this layer, then reshard())")


def _stored(t: torch.Tensor) -> torch.Tensor:
    """An NF4 tensor in its storage dtype: float32 as its int32 bit pattern (a view)."""
    return t.reshape(-1).view(torch.int32) if t.dtype == torch.float32 else t


def _viewed(p: torch.Tensor | None) -> torch.Tensor | None:
    """The NF4 tensor a stored parameter holds (a view: float32 from int32 bits)."""
    return p.view(torch.float32) if p is not None and p.dtype == torch.int32 else p


class _AnyAttribute:
    """Every public attribute is this object again. ``torch.distributed.
    checkpoint.state_dict`` resolves each state-dict key by ``getattr`` along
    its dots, and bitsandbytes' keys (``weight.absmax``, ``weight.quant_state.
    bitsandbytes__nf4``) are no attribute paths; ``Linear4bit._fqn_modifiers``
    (that module's hook) points the walk here, which keeps the key as it is."""

    def __getattr__(self, name: str) -> "_AnyAttribute":
        if name.startswith("_"):  # (the walk asks for hooks such as _fqn_modifiers)
            raise AttributeError(name)
        return self


_ANY_ATTRIBUTE = _AnyAttribute()


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
    for name, t in (("linear.weight", weight), ("linear.bias", bias)):
        if t is not None and t.is_meta:
            raise ValueError(f"{name} is a meta tensor (a shape without values), so there is nothing to "
                             "quantize or copy: load the model's weights first (e.g. build it on a real "
                             "device, or model.to_empty(device=...) then load_state_dict), then convert")
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
            if bias.is_meta and weight.device.type != "meta":
                raise ValueError(
                    f"bias is a meta tensor (a shape without values) but the weight is on {weight.device}: "
                    "pass the bias with its values (load the model's weights before converting it), or "
                    "build the layer with bias=None, or build it on the meta device (weight and bias) and "
                    "load a state dict into it later")
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
        for name, field in _QUANT_PARAMS.items():
            t = getattr(qw, field)
            if t is not None:
                t = nn.Parameter(t.reshape(-1, 1) if name == "weight" else _stored(t), requires_grad=False)
            self.register_parameter(name, t)
        # Static facts, kept as Python values so forward reads no tensor data
        # and a sharded layer writes its quant_state without a collective.
        self._qshape, self._qdtype = qw.shape, qw.dtype
        self._blocksize, self._blocksize2 = qw.blocksize, qw.blocksize2
        self._double_quant = qw.double_quant
        self._offset = float(qw.offset) if qw.double_quant and qw.device.type != "meta" else None
        self._weight_cache = ((), (), None, ())
        self._casts: dict[str, tuple] = {}

    def nf4_parameters(self) -> dict[str, nn.Parameter]:
        """The frozen parameters that store the NF4 weight, by attribute name."""
        return {n: p for n in _QUANT_NAMES if (p := self._parameters.get(n)) is not None}

    def _build_weight(self) -> tuple[NF4Weight, tuple]:
        params = tuple(map(self._parameters.get, _QUANT_NAMES))
        if any(map(is_dtensor, params)):
            raise RuntimeError(f"{type(self).__name__}: {SHARDED_HINT}")
        packed, absmax, code, absmax2, code2, offset = map(_viewed, params)
        qw = NF4Weight(packed=packed, absmax=absmax, shape=self._qshape, dtype=self._qdtype,
                       blocksize=self._blocksize, code=code, absmax2=absmax2, code2=code2,
                       offset=offset, blocksize2=self._blocksize2)
        # (parameters it was built from, their data pointers, the weight, the ops' arguments)
        self._weight_cache = (params, self._data_ptrs(params), qw, weight_args(qw))
        self._casts: dict[str, tuple] = {}
        return qw, self._weight_cache[3]

    @staticmethod
    def _data_ptrs(params: tuple) -> tuple:
        return tuple(p.data_ptr() for p in params if p is not None)

    def _weight(self) -> tuple[NF4Weight, tuple]:
        """``(quant_weight, weight_args(quant_weight))``, rebuilt only when a
        parameter is not the tensor it was built from or its data has moved
        (FSDP2 all-gathers into the same Parameter objects, whose storage it
        frees after each use and allocates again)."""
        built, ptrs, qw, args = self._weight_cache
        params = tuple(map(self._parameters.get, _QUANT_NAMES))
        if all(map(operator.is_, built, params)) and len(built) == len(params) and (
                torch.compiler.is_compiling() or ptrs == self._data_ptrs(params)):
            return qw, args  # (a compiled graph guards on the tensors itself)
        return self._build_weight()

    @property
    def quant_weight(self) -> NF4Weight:
        """An ``NF4Weight`` view of the parameters (no copy, no device sync); a
        sharded layer raises (see the module docstring)."""
        return self._weight()[0]

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda() move the NF4 tensors, but never change their dtypes
        # (Module.type() would cast the integer storage too).
        before = {n: p.dtype for n, p in self.nf4_parameters().items()}
        super()._apply(fn, recurse)
        for name, p in self.nf4_parameters().items():
            if p.dtype != before[name]:
                raise TypeError(f"{type(self).__name__}.{name}: the NF4 storage must stay {before[name]}, "
                                f"a conversion made it {p.dtype}")
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
                f"double_quant={self._double_quant}, compute_dtype={self.compute_dtype}")

    # -- state dict in bitsandbytes' keys ----------------------------------------------
    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint.state_dict's hook: resolve "weight.<...>" keys (see _AnyAttribute).
        return {"weight": "_any_attribute"}

    _any_attribute = _ANY_ATTRIBUTE

    def _bnb_tensors(self) -> dict[str, torch.Tensor]:
        """bitsandbytes' tensors after ``weight``, straight from the parameters
        (plain or sharded; float32 ones as views of their int32 storage)."""
        out = {}
        for name, field in _QUANT_PARAMS.items():
            p = self._parameters.get(name)
            if p is not None and field in _BNB_KEY:
                out[_BNB_KEY[field]] = _viewed(p)
        offset = self._nested_offset()
        nested = (self._blocksize2, offset) if self._double_quant else None
        if nested is None or offset is not None:  # (a meta skeleton has no offset yet)
            out[_QUANT_STATE_KEY] = quant_state_blob(self._qshape, self._qdtype, self._blocksize, nested)
        return out

    def _nested_offset(self) -> float | None:
        """The nested offset for the quant_state JSON: read from ``weight_offset``
        itself when it is a whole tensor, so that in-place writes the layer does
        not see (DDP's sync from rank 0 at construction, ``copy_`` under no_grad)
        are saved as the kernels use them. A sharded one (only rank 0 may hold its
        element) gives the value kept when it was set or loaded."""
        p = self._parameters.get("weight_offset")
        if p is None or is_dtensor(p) or p.device.type == "meta":
            return self._offset
        return float(_viewed(p).reshape(()))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for suffix, t in self._bnb_tensors().items():
            destination[prefix + "weight" + suffix] = t if keep_vars else t.detach()
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
            # set_model_state_dict adds each parameter under its own name too
            # (weight_absmax ...): the bitsandbytes keys are the ones read.
            handled |= qkeys | {prefix + n for n in _QUANT_NAMES if prefix + n in state_dict}
            sd = {k[len(prefix):]: state_dict[k] for k in qkeys}
            try:
                if is_dtensor(self._parameters["weight"]):
                    self._load_shards(sd)
                else:
                    qw = self._weight_from_state_dict(sd)
                    if tuple(qw.shape) != (self.out_features, self.in_features):
                        raise ValueError(f"shape {tuple(qw.shape)} does not match this layer's "
                                         f"({self.out_features}, {self.in_features})")
                    self._set_quant_weight(qw.to(self.weight.device))
            except (KeyError, TypeError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}")
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
                        _copy_into(self.bias, bias)
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
        if any(map(is_dtensor, sd.values())):
            raise TypeError("a sharded (DTensor) state dict loads only into a layer sharded by FSDP2; "
                            "gather it first (get_model_state_dict(..., options=StateDictOptions("
                            "full_state_dict=True)))")
        if weight.dtype in FLOAT_DTYPES and len(sd) == 1:
            # A dense nn.Linear checkpoint: quantize it like this layer's weight.
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"dense shape {tuple(weight.shape)} does not match this layer's "
                                 f"({self.out_features}, {self.in_features})")
            return quantize_nf4(weight.to(self.weight.device), blocksize=self._blocksize,
                                double_quant=self._double_quant)
        return NF4Weight.from_state_dict(sd, "weight")

    def _load_shards(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy bitsandbytes' tensors into this sharded layer's shards, in place
        (FSDP2 holds the Parameter objects). Each value is a full tensor (this
        rank keeps its rows; the whole weight is checked first) or a DTensor
        sharded as the parameter (copied as it is)."""
        if not any(map(is_dtensor, sd.values())):
            self._check_same_format(self._weight_from_state_dict(sd))
        else:
            key = "weight" + _QUANT_STATE_KEY
            if key not in sd:
                raise ValueError(f"state_dict has no {key!r}: not a bitsandbytes NF4 weight")
            self._check_same_format(parse_quant_state(key, sd[key]))
        fields = {_BNB_KEY[f]: n for n, f in _QUANT_PARAMS.items() if f in _BNB_KEY}
        with torch.no_grad():
            for suffix, name in fields.items():
                p = self._parameters.get(name)
                if p is None:
                    continue
                if "weight" + suffix not in sd:
                    raise ValueError(f"state_dict has no 'weight{suffix}', which this layer needs")
                _copy_into(p, _stored(sd["weight" + suffix].contiguous())
                           if name != "weight" else sd["weight"].view(torch.uint8), f"weight{suffix}")
                local = _viewed(p.to_local())
                if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                    raise ValueError(f"weight{suffix} contains NaN or Inf; the weight is corrupt")
            if self._double_quant:
                offset = _stored(torch.tensor([self._offset], dtype=torch.float32))
                _copy_into(self.weight_offset, offset, "nested_offset")

    def _check_same_format(self, got: NF4Weight | dict) -> None:
        """A sharded layer keeps its format: ``got`` (a weight or its quant_state
        JSON) must have this layer's shape, dtype, blocksize and nesting; the
        nested offset is taken from it."""
        if isinstance(got, NF4Weight):
            facts = (tuple(got.shape), got.dtype, got.blocksize, got.double_quant,
                     got.blocksize2 if got.double_quant else None)
            offset = float(got.offset) if got.double_quant else None
        else:
            dtypes = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
            nested = "nested_blocksize" in got
            facts = (tuple(got.get("shape", ())), dtypes.get(got.get("dtype")), got.get("blocksize"), nested,
                     got.get("nested_blocksize"))
            offset = got.get("nested_offset") if nested else None
            if nested and (isinstance(offset, bool) or not isinstance(offset, (int, float))
                           or not math.isfinite(offset)):
                raise ValueError(f"quant_state: nested_offset must be a finite number, got {offset!r}")
        mine = (tuple(self._qshape), self._qdtype, self._blocksize, self._double_quant,
                self._blocksize2 if self._double_quant else None)
        if facts != mine:
            raise ValueError(f"a layer sharded by FSDP2 loads only its own format (shape, dtype, blocksize, "
                             f"double_quant, nested blocksize) {mine}, got {facts}")
        self._offset = None if offset is None else float(torch.tensor(offset, dtype=torch.float32))


def _copy_into(p: torch.Tensor, value: torch.Tensor, name: str = "bias") -> None:
    """``p.copy_(value)`` for a plain or sharded ``p``: a full ``value`` gives
    this rank its rows (FSDP2's dim-0 chunks); a DTensor must be sharded as ``p``."""
    if not is_dtensor(p):
        if is_dtensor(value):
            raise TypeError(f"{name}: a DTensor loads only into a parameter sharded by FSDP2")
        p.copy_(value)
        return
    local = p.to_local()
    if is_dtensor(value):
        if value.shape != p.shape or value.placements != p.placements or value.device_mesh != p.device_mesh:
            raise ValueError(f"{name}: a DTensor {tuple(value.shape)} {value.placements} does not match "
                             f"the parameter's {tuple(p.shape)} {p.placements}")
        part = value.to_local()
    else:
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {tuple(p.shape)}")
        part = _local_rows(value, p)
    if part.dtype != local.dtype:
        if part.element_size() != local.element_size():
            raise TypeError(f"{name}: dtype {part.dtype} cannot fill the {local.dtype} storage")
        part = part.view(local.dtype)
    local.copy_(part)


def _local_rows(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full`` for the dim-0 sharded DTensor ``p``
    (FSDP2's rule: ``torch.chunk`` over the mesh, trailing ranks may be empty)."""
    (placement,) = p.placements
    if not placement.is_shard(0):
        raise ValueError(f"only FSDP2's Shard(0) placement is supported, got {p.placements}")
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    rows = -(-full.shape[0] // world) if full.shape[0] else 0
    return full[rank * rows:(rank + 1) * rows].to(p.device)


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
