"""Public quantize / dequantize entry points: input checks, then the backend
chosen by :func:`qlora_triton.backend.use_triton`."""

from __future__ import annotations

from typing import Any

import torch

from . import reference
from .backend import use_triton
from .codebooks import dynamic_map, nf4_codebook
from .weight import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Weight, check_blocksize


def check_float_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_quantize_input(name: str, t: Any) -> None:
    check_float_tensor(name, t)
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it has no values to quantize")
    if t.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor, why: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; {why}")


def _check_code_256(code: Any, device: torch.device) -> torch.Tensor:
    """A sorted, finite fp32 codebook of 256 entries on ``device``."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"code must be a float32 tensor of shape (256,), got {code.dtype} {tuple(code.shape)}")
    code = code.to(device).contiguous()
    _check_finite("code", code, "a codebook needs finite values")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must be sorted ascending (nearest-code rounding searches its midpoints)")
    return code


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of any tensor (any strides) against a sorted
    256-entry fp32 codebook: returns ``(q uint8 [x.numel()], absmax fp32 [nblocks])``
    for blocks of ``blocksize`` consecutive elements of ``x``'s row-major order.
    NaN or Inf in ``x`` is a ``ValueError`` (8 bits cannot hold it)."""
    _check_quantize_input("x", x)
    check_blocksize(blocksize)
    code = _check_code_256(code, x.device)
    _check_finite("x", x, "an 8-bit code cannot represent it")
    flat = x.detach().contiguous().reshape(-1)
    if use_triton(x.device):
        from .ops.quantize import blockwise_8bit_quantize
        return blockwise_8bit_quantize(flat, code, blocksize)
    return reference.blockwise_8bit_quantize(flat, code, blocksize)


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[q] * absmax[block]`` in
    fp32, cast to ``dtype``; returns a flat tensor of ``q.numel()`` elements."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError(f"q must be a uint8 torch.Tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    check_blocksize(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    nblocks = -(-q.numel() // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.numel() != nblocks:
        got = (f"{absmax.dtype} with {absmax.numel()} elements" if isinstance(absmax, torch.Tensor)
               else type(absmax).__name__)
        raise ValueError(f"absmax must be float32 with {nblocks} elements (one per {blocksize} of "
                         f"q's {q.numel()}), got {got}")
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}")
    code = _check_code_256(code, q.device)
    flat_q, flat_absmax = q.contiguous().reshape(-1), absmax.contiguous().reshape(-1)
    if use_triton(q.device):
        from .ops.dequantize import blockwise_8bit_dequantize
        return blockwise_8bit_dequantize(flat_q, flat_absmax, code, blocksize, dtype)
    return reference.blockwise_8bit_dequantize(flat_q, flat_absmax, code, blocksize, dtype)


def _nested_offset(absmax: torch.Tensor) -> torch.Tensor:
    """``mean(absmax)`` in fp32, as bitsandbytes (so offsets match it bit for
    bit); when the fp32 sum overflows (scales near 3.4e38), the mean in float64,
    which always fits fp32 again (it is at most the largest scale)."""
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        offset = absmax.double().mean().float()
    return offset


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` (any shape and strides; fp32, fp16 or bf16) to NF4 with one
    absmax per ``blocksize`` consecutive elements of its row-major flattening, and
    with ``double_quant`` the absmax themselves to 8 bits (blocks of 256). NaN or
    Inf in ``w``, or scales that double quantization cannot hold in fp32, are a
    ``ValueError``."""
    _check_quantize_input("w", w)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    _check_finite("w", w, "NF4 cannot represent it (the block's scale would be NaN)")
    flat = w.detach().contiguous().reshape(-1)
    code = nf4_codebook(w.device)
    if use_triton(w.device):
        from .ops.quantize import nf4_quantize
        packed, absmax = nf4_quantize(flat, blocksize)
    else:
        packed, absmax = reference.nf4_quantize(flat, code, blocksize)
    fields: dict[str, Any] = {}
    if double_quant:
        offset = _nested_offset(absmax)
        code2 = dynamic_map(w.device)
        absmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code2, NESTED_BLOCKSIZE)
        fields = dict(absmax2=absmax2, code2=code2, offset=offset)
    qw = NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype,
                   blocksize=blocksize, code=code, **fields)
    try:
        return qw.check_finite()
    except ValueError as e:
        # Only the nested scales can get here (w was finite): dyn * absmax2 +
        # offset rounds above fp32's maximum for scales near 3.4e38.
        raise ValueError(f"w: its scales (largest |w| = {float(w.abs().max()):.3e}) overflow float32 "
                         f"once double-quantized ({e}); use double_quant=False") from e


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (shape ``qw.shape``): ``code[nibble] * absmax`` in fp32,
    then cast to ``dtype`` (default: the dtype the weight was quantized from).
    A NaN or Inf anywhere in ``qw``'s codebooks or scales is a ``ValueError``."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    qw.check_finite()  # a hand-built weight may hold NaN; one sync per (explicit) dequantize
    if use_triton(qw.device):
        from .ops.dequantize import nf4_dequantize
        return nf4_dequantize(qw, dtype)
    return reference.nf4_dequantize(qw, dtype)
