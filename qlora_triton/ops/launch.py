"""The one launch path of the matmul kernels: a kernel runs with the config the
shipped table (:mod:`.tuned_sm90`) picks, or, with ``QLORA_TRITON_AUTOTUNE=1``
on a GPU, with the best of that table's candidates timed by Triton's autotuner.
Also the ``tl.dot`` input precision, which follows torch's own fp32 setting."""

from __future__ import annotations

import torch
import triton

from ..backend import INTERPRET
from .tuned_sm90 import autotune_enabled

_autotuned: dict = {}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: for fp32,
    torch's setting (``torch.get_float32_matmul_precision()``, which
    ``torch.backends.cuda.matmul.allow_tf32`` also sets): "highest" -> "ieee"
    (full fp32 products), "high"/"medium" -> "tf32" (tensor cores, 10-bit
    mantissa). 16-bit operands are exact either way: "tf32", Triton's default."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def launch(kernel, grid, args: tuple, const: dict, cfg: triton.Config, candidates=None,
           prune=None, reset_to_zero=None) -> None:
    """Run ``kernel`` (a ``@triton.jit`` function) on ``grid`` (a tuple, or a
    function of the config's meta-parameters) with ``cfg``; under
    QLORA_TRITON_AUTOTUNE=1 (compiled kernels only) the autotuner picks among
    ``candidates`` (pruned by ``prune``) instead, keyed on N, K, M, BLOCKSIZE."""
    if candidates is not None and autotune_enabled() and not INTERPRET:
        tuned = _autotuned.get(kernel)
        if tuned is None:
            tuned = triton.autotune(configs=list(candidates), key=["N", "K", "M", "BLOCKSIZE"],
                                    reset_to_zero=reset_to_zero,
                                    prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)
            _autotuned[kernel] = tuned
        tuned[grid if callable(grid) else (lambda META: grid)](*args, **const)
        return
    g = grid(cfg.kwargs) if callable(grid) else grid
    kernel[g](*args, **const, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
