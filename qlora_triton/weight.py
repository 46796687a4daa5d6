"""``NF4Weight``: the typed container of a 4-bit NormalFloat weight.

Layout (bitsandbytes-compatible, see docs/format.md): the weight is flattened
row-major, cut into blocks of ``blocksize`` consecutive elements (a block may
cross a row; the last may be partial), each element stored as a 4-bit index
into ``code``, two per byte with the first element in the high nibble. Each
block has one fp32 ``absmax`` scale. With double quantization, ``absmax`` holds
uint8 indices into ``code2`` (the signed dynamic map), and a block's scale is
``code2[absmax[i]] * absmax2[i // blocksize2] + offset``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from typing import Any, Mapping

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize: Any, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if not (32 <= blocksize <= 4096) or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in 32..4096, got {blocksize}")
    return blocksize


def _check_tensor(name: str, t: Any, dtype: torch.dtype, numel: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")


def _check_shape(shape: Any) -> torch.Size:
    if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    dims = []
    for dim in shape:
        try:  # ints and int-like scalars (numpy, 0-d int tensors), never floats or bools
            dims.append(operator.index(dim))
        except TypeError:
            dims.append(None)
        if isinstance(dim, bool) or dims[-1] is None or dims[-1] < 0:
            raise ValueError(f"shape must hold non-negative ints, got {tuple(shape)}")
    return torch.Size(dims)


def _dense(t: torch.Tensor) -> torch.Tensor:
    # The kernels index every field as a dense array. A contiguous tensor (also
    # an offset view) is kept as is, so module parameters stay aliased; a strided
    # or expanded (stride 0) one is copied once, here, not per launch.
    return t if t.is_contiguous() else t.contiguous()


@dataclasses.dataclass
class NF4Weight:
    """A frozen weight in NF4, optionally with double-quantized scales.

    Attributes:
        packed:  uint8 [(numel + 1) // 2], two 4-bit codes per byte, high nibble first.
        absmax:  float32 [nblocks] scales, or uint8 [nblocks] indices into ``code2``
                 when double-quantized.
        shape:   the dense weight's shape, ``[out_features, in_features]`` for a linear.
        dtype:   the dense weight's dtype (what ``dequantize_nf4`` returns by default).
        blocksize: elements per absmax scale (power of two, 32..4096).
        code:    float32 [16], the NF4 codebook.
        absmax2: float32 [ceil(nblocks / blocksize2)], second-level scales (nested only).
        code2:   float32 [256], the signed dynamic map (nested only).
        offset:  float32 0-d tensor, mean of the absmax subtracted before nesting.
        blocksize2: absmax values per second-level block (256).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        # Structural checks only: they read no tensor data, so they cost no
        # device synchronization. Value checks live in ``check_finite``.
        self.shape = _check_shape(self.shape)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        check_blocksize(self.blocksize)
        check_blocksize(self.blocksize2, "blocksize2")
        if self.numel == 0:
            raise ValueError(f"shape must have at least one element, got {tuple(self.shape)}")
        _check_tensor("packed", self.packed, torch.uint8, (self.numel + 1) // 2)
        self.packed = _dense(self.packed).reshape(-1)
        _check_tensor("code", self.code, torch.float32, 16)
        nested = {n: getattr(self, n) for n in ("absmax2", "code2", "offset")}
        if self.double_quant:
            missing = [n for n, t in nested.items() if t is None]
            if missing:
                raise ValueError(f"a uint8 absmax (double quantization) needs {', '.join(missing)}")
            _check_tensor("absmax", self.absmax, torch.uint8, self.nblocks)
            _check_tensor("absmax2", self.absmax2, torch.float32, math.ceil(self.nblocks / self.blocksize2))
            _check_tensor("code2", self.code2, torch.float32, 256)
            _check_tensor("offset", self.offset, torch.float32, 1)
            self.offset = self.offset.reshape(())
        else:
            _check_tensor("absmax", self.absmax, torch.float32, self.nblocks)
            given = [n for n, t in nested.items() if t is not None]
            if given:  # read as plain scales they would be ignored: a silently wrong weight
                raise ValueError(f"absmax is float32 (plain scales) but {', '.join(given)} "
                                 "(double quantization) given: a nested absmax must be uint8")
        devices = {t.device for t in self.tensors().values()}
        if len(devices) > 1:
            raise ValueError(f"all tensors of an NF4Weight must be on one device, got {devices}")
        for name, t in self.tensors().items():
            setattr(self, name, _dense(t))

    @classmethod
    def empty(cls, shape: tuple, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
              device: torch.device | str = "meta") -> "NF4Weight":
        """A weight with the layout ``quantize_nf4`` makes for a ``shape`` tensor,
        its values uninitialized: the skeleton of a model built on the meta
        device (for tensor accounting), where there is nothing to quantize."""
        numel = math.prod(_check_shape(shape))
        blocks = math.ceil(numel / check_blocksize(blocksize))
        f32 = dict(dtype=torch.float32, device=device)
        nested: dict[str, Any] = {}
        if double_quant:
            nested = dict(absmax2=torch.empty(math.ceil(blocks / NESTED_BLOCKSIZE), **f32),
                          code2=torch.empty(256, **f32), offset=torch.empty((), **f32))
        return cls(packed=torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device),
                   absmax=torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                      device=device),
                   shape=shape, dtype=dtype, blocksize=blocksize,
                   code=torch.empty(16, **f32), **nested)

    # -- shape facts ---------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this weight holds, by field name."""
        names = ("packed", "absmax", "code", "absmax2", "code2", "offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor stored for this weight, codebooks included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> "NF4Weight":
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block float32 scales, unpacked from the nested form if needed."""
        if not self.double_quant:
            return self.absmax
        blocks = torch.arange(self.nblocks, device=self.device) // self.blocksize2
        return self.code2[self.absmax.long()] * self.absmax2[blocks] + self.offset

    def check_finite(self) -> "NF4Weight":
        """Raise a ``ValueError`` if a codebook, a nested constant or a block's
        scale is NaN or Inf (such a block would dequantize to NaN or Inf
        silently, as in bitsandbytes); returns ``self``. It reads the data (one
        device sync), so it runs where weights enter: ``quantize_nf4``,
        ``from_state_dict``, ``from_bnb``, ``Linear4bit`` and ``dequantize_nf4``,
        not in every matmul. Meta tensors hold no values: nothing to check
        (a skeleton built on the meta device is checked when its data arrives)."""
        if self.device.type == "meta":
            return self
        for name in ("code", "code2", "offset"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf; the weight is corrupt")
        # The unpacked scales: NaN/Inf in absmax or absmax2, or finite nested
        # parts whose sum overflows float32.
        bad = ~torch.isfinite(self.absmax_fp32())
        if bool(bad.any()):
            blocks = bad.nonzero().flatten()
            where = " (absmax2 contains NaN or Inf)" if self.double_quant and not bool(
                torch.isfinite(self.absmax2).all()) else ""
            raise ValueError(
                f"absmax: {blocks.numel()} of {self.nblocks} blocks have a NaN or Inf scale "
                f"(first block {int(blocks[0])}){where}; the weight is corrupt"
            )
        return self

    # -- bitsandbytes state-dict form (no bitsandbytes needed) -------------------
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors under bitsandbytes' ``Linear4bit`` state-dict keys."""
        out = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.code,
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.code2
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = quant_state_blob(
            self.shape, self.dtype, self.blocksize,
            (self.blocksize2, float(self.offset)) if self.double_quant else None)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        """Build from bitsandbytes' ``Linear4bit`` state-dict keys under ``prefix``
        (or PEFT's form of them, ``base_layer.`` before the last part of it).

        The one reader of bitsandbytes' 4-bit state dicts: what bitsandbytes
        writes is accepted, nested or plain, with any float ``dtype`` and
        ``nested_dtype``, and a plain ``absmax`` in a 16-bit dtype or in the
        transposed ``[cols // blocksize, rows]`` layout of its CPU repacking.
        Nested scales stored with a ``nested_dtype`` other than float32 (written
        after bitsandbytes' AVX512-BF16 CPU repacking) are unpacked as
        bitsandbytes unpacks them (rounded to that dtype, then the offset added
        in it) into plain float32 scales, so the weight dequantizes bit for bit
        as in bitsandbytes. A missing key or a malformed ``quant_state`` is a
        ``ValueError`` naming it."""
        prefix = _resolve_prefix(state_dict, prefix)
        key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if key not in state_dict:
            fp4 = f"{prefix}.quant_state.bitsandbytes__fp4"
            if fp4 in state_dict:
                raise ValueError(f"state_dict: {fp4} is an FP4 weight; only NF4 is supported")
            raise ValueError(f"state_dict has no {key!r}: not a bitsandbytes NF4 weight")

        def tensor(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise ValueError(f"state_dict has no {name!r}, which {key!r} needs")
            t = state_dict[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state_dict[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            return t

        meta = parse_quant_state(key, tensor(key))
        packed = tensor(prefix)
        if packed.dtype != torch.uint8 and packed.element_size() != 1:
            raise TypeError(f"state_dict[{prefix!r}] must hold packed bytes (uint8), got {packed.dtype}")
        dtype = _dtype_field(key, meta, "dtype")
        shape = _field(key, meta, "shape", list)
        blocksize = _field(key, meta, "blocksize", int)
        absmax = tensor(f"{prefix}.absmax")
        nested: dict[str, Any] = {}
        if "nested_blocksize" in meta or f"{prefix}.nested_absmax" in state_dict:
            nested = dict(
                absmax2=tensor(f"{prefix}.nested_absmax"),
                code2=tensor(f"{prefix}.nested_quant_map"),
                offset=torch.tensor(_field(key, meta, "nested_offset", float), device=packed.device),
                blocksize2=_field(key, meta, "nested_blocksize", int),
            )
            nested_dtype = _dtype_field(key, meta, "nested_dtype") if "nested_dtype" in meta else torch.float32
        try:
            if nested and nested_dtype != torch.float32:
                absmax, nested = unpack_nested_scales(absmax, nested_dtype=nested_dtype, **nested), {}
            elif not nested:
                absmax = _plain_absmax(absmax, shape, blocksize)
            return cls(
                packed=packed.view(torch.uint8).reshape(-1),
                absmax=absmax,
                shape=shape,
                dtype=dtype,
                blocksize=blocksize,
                code=tensor(f"{prefix}.quant_map"),
                **nested,
            ).check_finite()
        except (TypeError, ValueError) as e:
            raise type(e)(f"state_dict under {prefix!r}: {e}") from e

    # -- bitsandbytes objects ----------------------------------------------------
    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """``(packed, QuantState)`` as ``bitsandbytes.functional.quantize_4bit`` returns them."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2,
                                blocksize=self.blocksize2, dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=self.code,
                        blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                        offset=self.offset, state2=state2)
        return self.packed.reshape(-1, 1), qs

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> "NF4Weight":
        """Wrap the outputs of ``bitsandbytes.functional.quantize_4bit`` (no copy)."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(
                f"quant_state: quant_type must be 'nf4', got {getattr(quant_state, 'quant_type', None)!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state: this bitsandbytes layer was repacked for its AVX512-BF16 CPU kernel "
                             "(at a CPU forward); read its state_dict() instead, which bitsandbytes writes "
                             "in the standard layout")
        absmax = quant_state.absmax
        kwargs: dict[str, Any] = {}
        if quant_state.nested:
            state2 = quant_state.state2
            kwargs = dict(absmax2=state2.absmax, code2=state2.code,
                          offset=torch.as_tensor(quant_state.offset, device=packed.device),
                          blocksize2=state2.blocksize)
            if state2.dtype != torch.float32:  # (see from_state_dict)
                absmax, kwargs = unpack_nested_scales(absmax, nested_dtype=state2.dtype, **kwargs), {}
            else:
                kwargs["offset"] = kwargs["offset"].to(torch.float32)
        else:
            absmax = _plain_absmax(absmax, list(quant_state.shape), quant_state.blocksize)
        return cls(
            packed=packed.view(torch.uint8).reshape(-1),
            absmax=absmax,
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            code=quant_state.code,
            **kwargs,
        ).check_finite()


def _resolve_prefix(state_dict: Mapping[str, Any], prefix: str) -> str:
    """``prefix``, or PEFT's name for it (``a.base_layer.weight`` for ``a.weight``)
    when only that one is in ``state_dict``."""
    if f"{prefix}.quant_state.bitsandbytes__nf4" in state_dict or prefix in state_dict:
        return prefix
    head, _, last = prefix.rpartition(".")
    peft = f"{head}.base_layer.{last}" if head else f"base_layer.{last}"
    return peft if f"{peft}.quant_state.bitsandbytes__nf4" in state_dict else prefix


def unpack_nested_scales(absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                         offset: torch.Tensor, blocksize2: int, nested_dtype: torch.dtype) -> torch.Tensor:
    """Plain float32 scales from double-quantized ones whose second level is
    stored in ``nested_dtype``, computed as bitsandbytes' ``dequantize_4bit``
    does: ``code2[q] * absmax2`` in float32 rounded to ``nested_dtype``, the
    offset added in place (torch's rule: in ``nested_dtype``), then float32."""
    _check_tensor("absmax", absmax, torch.uint8)
    if nested_dtype not in FLOAT_DTYPES:
        raise TypeError(f"nested_dtype must be float32, float16 or bfloat16, got {nested_dtype}")
    check_blocksize(blocksize2, "blocksize2")
    q = absmax.reshape(-1).long()
    blocks = torch.arange(q.numel(), device=q.device) // blocksize2
    absmax2 = absmax2.reshape(-1).to(torch.float32)
    if absmax2.numel() != math.ceil(q.numel() / blocksize2):
        raise ValueError(f"absmax2 has {absmax2.numel()} elements, expected {math.ceil(q.numel() / blocksize2)}")
    scales = (code2.to(torch.float32)[q] * absmax2[blocks]).to(nested_dtype)
    scales += offset
    return scales.to(torch.float32)


def _plain_absmax(absmax: Any, shape: list, blocksize: int) -> Any:
    """A plain (not nested) ``absmax`` as float32 ``[nblocks]``: a 16-bit one
    upcast (exact), bitsandbytes' CPU-repacked ``[cols // blocksize, rows]``
    layout transposed back to row-major blocks."""
    if not isinstance(absmax, torch.Tensor) or absmax.dtype not in FLOAT_DTYPES:
        return absmax  # (the constructor names what is wrong)
    if (absmax.dim() == 2 and len(shape) == 2 and shape[1] % blocksize == 0
            and tuple(absmax.shape) == (shape[1] // blocksize, shape[0]) and shape[0] > 1):
        absmax = absmax.t()
    return absmax.reshape(-1).to(torch.float32)


def quant_state_blob(shape: torch.Size, dtype: torch.dtype, blocksize: int,
                     nested: tuple[int, float] | None) -> torch.Tensor:
    """bitsandbytes' ``quant_state.bitsandbytes__nf4`` entry: uint8 bytes of JSON
    made from static facts only (``nested``: ``(blocksize2, offset)``), so it
    reads no tensor data."""
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(shape),
    }
    if nested is not None:
        meta.update(nested_blocksize=nested[0], nested_dtype="float32", nested_offset=nested[1])
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def parse_quant_state(key: str, blob: torch.Tensor) -> dict[str, Any]:
    """The JSON object stored as uint8 bytes under ``key``."""
    if blob.dtype != torch.uint8:
        raise TypeError(f"{key} must be uint8 bytes of JSON, got {blob.dtype}")
    try:
        meta = json.loads(bytes(blob.cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key} is not UTF-8 JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(meta).__name__}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    return meta


def _dtype_field(key: str, meta: dict[str, Any], name: str) -> torch.dtype:
    """``meta[name]`` as one of the float dtypes (``"bfloat16"``, ``"torch.float16"``)."""
    value = _field(key, meta, name, str)
    dtype = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}.get(value.removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"{key}: {name} must be 'float32', 'float16' or 'bfloat16', got {value!r}")
    return dtype


def _field(key: str, meta: dict[str, Any], name: str, kind: type) -> Any:
    """``meta[name]`` if it is a ``kind`` (an int never from a float, e.g. 64.7)."""
    if name not in meta:
        raise ValueError(f"{key} lacks {name!r}")
    value = meta[name]
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{key}: {name} must be a JSON {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value
