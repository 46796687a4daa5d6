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


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of any tensor against a sorted 256-entry
    codebook: returns ``(q uint8 [x.numel()], absmax fp32 [nblocks])``."""
    check_float_tensor("x", x)
    flat = x.detach().contiguous().reshape(-1)
    if use_triton(x.device):
        from .ops.quantize import blockwise_8bit_quantize
        return blockwise_8bit_quantize(flat, code.to(x.device), blocksize)
    return reference.blockwise_8bit_quantize(flat, code.to(x.device), blocksize)


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`; returns a flat tensor."""
    if use_triton(q.device):
        from .ops.dequantize import blockwise_8bit_dequantize
        return blockwise_8bit_dequantize(q.reshape(-1), absmax, code, blocksize, dtype)
    return reference.blockwise_8bit_dequantize(q, absmax, code, blocksize, dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` (any shape; fp32, fp16 or bf16) to NF4 with one absmax per
    ``blocksize`` consecutive elements of its row-major flattening, and with
    ``double_quant`` the absmax themselves to 8 bits (blocks of 256)."""
    check_float_tensor("w", w)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; NF4 cannot represent it (the block's scale would be NaN)")
    flat = w.detach().contiguous().reshape(-1)
    code = nf4_codebook(w.device)
    if use_triton(w.device):
        from .ops.quantize import nf4_quantize
        packed, absmax = nf4_quantize(flat, blocksize)
    else:
        packed, absmax = reference.nf4_quantize(flat, code, blocksize)
    fields: dict[str, Any] = {}
    if double_quant:
        offset = absmax.mean()
        code2 = dynamic_map(w.device)
        absmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code2, NESTED_BLOCKSIZE)
        fields = dict(absmax2=absmax2, code2=code2, offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype,
                     blocksize=blocksize, code=code, **fields)


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (shape ``qw.shape``): ``code[nibble] * absmax`` in fp32,
    then cast to ``dtype`` (default: the dtype the weight was quantized from)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if use_triton(qw.device):
        from .ops.dequantize import nf4_dequantize
        return nf4_dequantize(qw, dtype)
    return reference.nf4_dequantize(qw, dtype)
