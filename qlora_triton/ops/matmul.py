"""The NF4 matmul launchers' entry points: ``y = x @ W.T (+ bias)`` and
``grad_x = grad_y @ W`` through a packed NF4 weight. They pick the kernel
family (the strategy comes from :func:`qlora_triton.strategy.select_strategy`,
the config from the table in :mod:`.tuned_sm90`) and count what ran:

* "gemv" -> :mod:`.gemv` (M <= 16); "fused" -> :mod:`.gemm` (forward) and
  :mod:`.grad_input`; "dequant" -> :mod:`.scratch` (dequantize + cuBLAS).
* Within a family, ``K % blocksize == 0`` (every row starts on a 32-bit word)
  runs the word kernel, any other K the per-element decode (:mod:`.decode`).
"""

from __future__ import annotations

import collections

import torch

from ..strategy import select_strategy, strategies
from ..weight import NF4Weight
from .decode import scale_args
from .gemm import gemm_general, gemm_words
from .gemv import gemv_general, gemv_words
from .grad_input import grad_input_general, grad_input_words
from .launch import dot_precision
from .scratch import dequant_grad_input, dequant_matmul
from .split import _split_counters  # noqa: F401  (tests and the conftest read it here)

# How often each kernel family ran, by name ("gemm", "gemv", "grad_input",
# "dequantize"): tests read it to see which kernels a strategy launched
# (qlora_triton.strategy.strategies says which strategy ran).
launches: collections.Counter = collections.Counter()


def _weight_meta(qw: NF4Weight) -> dict:
    N, K = qw.shape
    if qw.numel >= 2**31:
        # Flat element indices are int32 in the kernels.
        raise ValueError(f"qw: weights with 2**31 or more elements are not supported, got {tuple(qw.shape)}")
    return dict(BLOCKSIZE=qw.blocksize, BLOCKSIZE2=qw.blocksize2, DOUBLE_QUANT=qw.double_quant)


INT32_LIMIT = 2**31  # element offsets in the kernels are int32


def _int32_row_chunks(a: torch.Tensor, out_cols: int) -> int | None:
    """Rows per launch so that every element offset of ``a`` [M, cols] and of the
    [M, out_cols] output fits the kernels' int32 arithmetic; ``None`` when one
    launch fits (the usual case). Beyond that (e.g. M >= 195k tokens against
    N = 11008) the launchers split the rows rather than wrap around."""
    M, cols = a.shape
    reach = (M - 1) * a.stride(0) + (cols - 1) * a.stride(1) + 1
    if max(reach, M * out_cols) < INT32_LIMIT:
        return None
    return max(1, (INT32_LIMIT - 1) // max(cols, out_cols))


def _weight_tensors(qw: NF4Weight) -> tuple:
    """(packed, code, absmax, absmax2, code2, offset) as the kernels read them:
    flat and contiguous (a strided or expanded field is copied once here)."""
    return tuple(t.contiguous() for t in (qw.packed, qw.code, *scale_args(qw)))


def _packed_words(qw: NF4Weight) -> torch.Tensor | None:
    """``qw.packed`` as int32 words for the word kernels, or ``None`` when they
    do not apply: they need K % blocksize == 0 (so K % 32 == 0 and every row
    starts on a word) and a 4-byte-aligned packed tensor. ``None`` is what
    sends a weight to the per-element-decode kernels, and only then."""
    if qw.shape[1] % qw.blocksize:
        return None
    packed = qw.packed.contiguous()
    if packed.storage_offset() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


def _gemv_operands(qw: NF4Weight) -> tuple:
    """``(words, weight tensors)`` of the word GEMVs (:func:`_packed_words`,
    :func:`_weight_tensors`), made once per weight and kept on it: at M = 1 the
    host time of a call is the cost. Rebuilt when a field of ``qw`` is replaced;
    copies made here (strided fields, a misaligned ``packed``) do not follow
    later in-place edits of the originals."""
    fields = (qw.packed, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset)
    kept = qw.__dict__.get("_gemv_operands")
    if kept is not None and all(a is b for a, b in zip(kept[0], fields)):
        return kept[1]
    operands = (_packed_words(qw), _weight_tensors(qw))
    qw.__dict__["_gemv_operands"] = (fields, operands)
    return operands


def _full_fp32(dtype: torch.dtype) -> bool:
    """fp32 operands whose dot torch's setting wants in full fp32 ("highest",
    :func:`.launch.dot_precision`). The per-element-decode kernels (K %
    blocksize != 0) cannot run that dot on sm_90 without spilling
    (sm90_compile, Triton 3.9: 0.03-24 KB at every tile tried, and 0.05-0.6 KB
    with "tf32x3"), so those calls take the "dequant" strategy instead: our
    dequantize, then torch's own fp32 matmul."""
    return dot_precision(dtype) == "ieee"


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for 2-D ``x`` [M, K] (any strides) and ``qw`` of shape
    [N, K]; returns a contiguous [M, N] tensor of ``x.dtype``. Inputs are assumed
    checked (see :mod:`qlora_triton.matmul`)."""
    M, K = x.shape
    N = qw.shape[0]
    rows = _int32_row_chunks(x, N)
    if rows is not None:
        x = x.contiguous()
        return torch.cat([nf4_matmul(x[i:i + rows], qw, bias) for i in range(0, M, rows)])
    if M == 0:
        return x.new_empty((0, N))
    meta = _weight_meta(qw)  # also the int32 limit of the dequantize kernel
    strategy = select_strategy(M, N, K, x.dtype, x.device, op="forward")
    if strategy != "dequant":
        words, tensors = _gemv_operands(qw)
        if words is None and _full_fp32(x.dtype):
            strategy = "dequant"  # see _full_fp32
    strategies["forward", strategy] += 1
    if strategy == "dequant":
        launches["dequantize"] += 1
        return dequant_matmul(x, qw, bias)
    kernel = "gemv" if strategy == "gemv" else "gemm"
    if bias is not None:
        bias = bias.contiguous()
    launches[kernel] += 1
    if kernel == "gemv":
        if words is not None:
            return gemv_words(x, words, tensors, qw, bias, meta)
        return gemv_general(x, tensors, qw, bias, meta)
    if words is not None:
        return gemm_words(x, words, tensors, qw, bias, meta)
    return gemm_general(x, tensors, qw, bias, meta)


def nf4_lora_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None, h: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x @ W.T (+ bias) + scaling * h @ lora_b.T`` for 2-D ``x`` [M, K], ``h``
    [M, r] (``x_d @ lora_A.T``) and ``lora_b`` [N, r]; a contiguous [M, N]
    tensor of x's dtype. Under the "gemv" strategy with word-aligned weights
    the update is folded into the GEMV's epilogue (one launch, summed in fp32
    with the base product before the one rounding); otherwise the base
    product, then one ``addmm_`` of the update into it."""
    M, K = x.shape
    N = qw.shape[0]
    if (0 < M and _int32_row_chunks(x, N) is None
            and select_strategy(M, N, K, x.dtype, x.device, op="forward") == "gemv"
            and h.dtype == x.dtype and lora_b.dtype == x.dtype and h.dim() == 2 and h.stride(1) == 1):
        words, tensors = _gemv_operands(qw)
        if words is not None:
            strategies["forward", "gemv"] += 1
            launches["gemv"] += 1
            if bias is not None:
                bias = bias.contiguous()
            return gemv_words(x, words, tensors, qw, bias, _weight_meta(qw), (h, lora_b, scaling))
    y = nf4_matmul(x, qw, bias)
    y.addmm_(h, lora_b.t(), alpha=scaling)
    return y


def nf4_matmul_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W`` for 2-D ``grad_y`` [M, N] (any strides); returns a contiguous
    [M, K] tensor of ``grad_y.dtype``."""
    M, N = grad_y.shape
    K = qw.shape[1]
    rows = _int32_row_chunks(grad_y, K)
    if rows is not None:
        grad_y = grad_y.contiguous()
        return torch.cat([nf4_matmul_grad_input(grad_y[i:i + rows], qw) for i in range(0, M, rows)])
    if M == 0:
        return grad_y.new_empty((0, K))
    meta = _weight_meta(qw)
    # No GEMV for grad-input: "gemv" and "fused" both run the fused kernel.
    if (select_strategy(M, N, K, grad_y.dtype, grad_y.device, op="grad_input") == "dequant"
            or (_gemv_operands(qw)[0] is None and _full_fp32(grad_y.dtype))):
        strategies["grad_input", "dequant"] += 1
        launches["dequantize"] += 1
        return dequant_grad_input(grad_y, qw)
    words, tensors = _gemv_operands(qw)
    strategies["grad_input", "fused"] += 1
    launches["grad_input"] += 1
    if words is not None:
        return grad_input_words(grad_y, words, tensors, qw, meta)
    return grad_input_general(grad_y, tensors, qw, meta)
