"""Compile every Triton kernel of the package ahead of time for sm_90 (Hopper),
without a GPU or driver, and report registers, spills and shared memory.

Why: CI runs the kernels under ``TRITON_INTERPRET=1``, which never lowers them
to PTX, so a kernel (or one autotune config of it) that fails to compile on the
GPU machine, or spills registers, would only show up there. Triton's CUDA
backend can compile for a target without a device: ``triton.compile(ASTSource,
target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline (TTIR, TTGIR,
LLVM, PTX, and ptxas to a cubin); ``ptxas -v`` on the PTX reports registers and
spill bytes, ``metadata.shared`` the shared memory.

These are compile facts, not GPU measurements.

Usage (TRITON_INTERPRET must be unset: the autotune config lists and launch
tile sizes the package builds depend on it)::

    python -m scripts.sm90_compile [--subset | --shipped] [--json PATH] [--jobs N] [--filter TEXT]

Launch specialization: Triton specializes integer arguments and pointers at
launch (``tt.divisibility`` 16 for multiples of 16 / 16-byte aligned pointers,
constant 1 for ints equal to 1). Each variant models a typical launch: torch
allocations are 16-byte aligned, x is row-major (``stride_xk == 1``); for
``ALIGNED`` matmuls N, K and the row stride are multiples of 16, for the general
path K (and with it the row stride) is not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH = 90
# Largest shared memory one block may use on H100/H200 (227 KB, opt-in): a
# config above it raises OutOfResources at launch.
SMEM_LIMIT = 227 * 1024
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_DIV16 = [["tt.divisibility", 16]]


@dataclasses.dataclass
class Variant:
    """One compile job: a kernel, its argument types, constexprs, launch attrs."""

    family: str             # "gemm", "gemv", "grad_input", "nf4_quantize", ...
    label: str              # human-readable constexprs/config
    module: str             # "qlora_triton.ops.matmul"
    kernel: str             # attribute name in the module (autotuned or plain)
    signature: dict         # arg name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict        # arg name -> value
    divisible: list         # arg names specialized as multiples of 16
    num_warps: int = 4
    num_stages: int = 3


def _require_compiled_mode() -> None:
    from qlora_triton.backend import INTERPRET

    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: unset it, the config lists and tile sizes "
                           "of the package differ under the interpreter")


def _jit_fn(kernel):
    """The JITFunction under an autotuner (``.fn``), or the kernel itself."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _sig(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
    return sig


# --------------------------------------------------------------------------- matmul
_MATMUL_POINTERS = ["packed_ptr", "code_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr"]


def _scale_types(double_quant: bool) -> dict:
    return {"packed_ptr": "*u8", "code_ptr": "*fp32",
            "absmax_ptr": "*u8" if double_quant else "*fp32",
            "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32"}


# Each kernel's module (one file per kernel family, ops/matmul.py dispatches).
KERNEL_MODULES = {
    "_nf4_gemv_fma_kernel": "qlora_triton.ops.gemv", "_nf4_gemv_dot_kernel": "qlora_triton.ops.gemv",
    "_nf4_gemv_kernel": "qlora_triton.ops.gemv", "_nf4_gemm_words_kernel": "qlora_triton.ops.gemm",
    "_nf4_gemm_kernel": "qlora_triton.ops.gemm",
    "_nf4_grad_input_words_kernel": "qlora_triton.ops.grad_input",
    "_nf4_grad_input_kernel": "qlora_triton.ops.grad_input",
}


def _kernel(name: str):
    import importlib

    return _jit_fn(getattr(importlib.import_module(KERNEL_MODULES[name]), name))


def _precision(dt: str, per_element: bool = False) -> str:
    """``DOT_PRECISION`` as the launcher sets it: "ieee" for fp32 x under
    torch's default fp32 setting ("highest", ops/launch.dot_precision). The
    per-element-decode kernels never get it (ops/matmul.py sends such calls to
    "dequant"): for them fp32 means "tf32" (the "high"/"medium" settings)."""
    if dt != "fp32" or per_element:
        return "tf32"
    return "ieee"


def _matmul_variants(kernel_name: str, family: str, configs, dtypes, aligned_opts, dq_opts,
                     bias_opts) -> list[Variant]:
    """The per-element-decode kernels (``family`` "gemm", "gemv", "grad_input"),
    which run only when K % blocksize != 0: ``aligned_opts`` must be [False]."""
    if any(aligned_opts):
        raise ValueError("the per-element-decode kernels run only for K % blocksize != 0")
    fn = _kernel(kernel_name)
    out = []
    for cfg in configs:
        tile = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        extra = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items() if not k.startswith("BLOCK_"))
        cfg_label = f"{tile} w{cfg.num_warps} s{cfg.num_stages} {extra}"
        for dt in dtypes:
            for dq in dq_opts:
                for bias in bias_opts:
                    ce = dict(cfg.kwargs, BLOCKSIZE=64, BLOCKSIZE2=256, DOUBLE_QUANT=dq,
                              DOT_FP32=False, DOT_PRECISION=_precision(dt, per_element=True))
                    types = dict(_scale_types(dq), M="i32", N="i32", K="i32")
                    if family == "grad_input":
                        types.update(gy_ptr=DTYPES[dt], gx_ptr=DTYPES[dt], stride_gm="i32")
                        ce["stride_gn"] = 1
                        # grad_y's row stride is N, a multiple of 16; K is not.
                        div = ["gy_ptr", "gx_ptr", "stride_gm"]
                    else:
                        types.update(x_ptr=DTYPES[dt], bias_ptr=DTYPES[dt], stride_xm="i32",
                                     y_ptr="*fp32" if family == "gemv" else DTYPES[dt])
                        ce["stride_xk"] = 1
                        ce["HAS_BIAS"] = bias
                        div = ["x_ptr", "bias_ptr", "y_ptr"]
                    div += _MATMUL_POINTERS + ["N"]
                    label = (f"{cfg_label} {dt} general dq={int(dq)}"
                             + (f" bias={int(bias)}" if family != "grad_input" else ""))
                    out.append(Variant(family, label, KERNEL_MODULES[kernel_name], kernel_name,
                                       _sig(fn, types, ce), ce, div, cfg.num_warps, cfg.num_stages))
    return out


def gemv_words_variants(kernel: str, configs, dtypes, dq_opts, bias_opts, rows_opts=(1,),
                        blocksize: int = 64, lora_opt: bool = False,
                        even_k_opts=(True,)) -> list[Variant]:
    """The aligned-path GEMVs, ``kernel`` "fma" (``ROWS`` rows of x) or "dot";
    they read the packed bytes as int32 words. ``lora_opt``: also each config
    with the folded LoRA epilogue (and a bias). ``even_k_opts``: the FMA
    kernel's EVEN_K values (True: K a multiple of BLOCK_K, no masks, as on
    the profiled shapes; False: the masked loop of partial trips)."""
    from qlora_triton.ops import tuned_sm90

    name = f"_nf4_gemv_{kernel}_kernel"
    fn = _kernel(name)
    out = []
    for cfg in configs:
        kw = cfg.kwargs
        cfg_label = (f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} "
                     f"SPLIT_K={kw['SPLIT_K']}")
        # Only what the launcher and the autotune pruner can run.
        for dt in [d for d in dtypes if tuned_sm90.allowed(cfg, blocksize, d == "fp32", kernel)]:
            for dq in dq_opts:
                for bias, lora in [(b, False) for b in bias_opts] + ([(True, True)] if lora_opt else []):
                    for rows, even in ([(r, e) for r in rows_opts for e in even_k_opts]
                                       if kernel == "fma" else [(16, True)]):
                        ce = dict(kw, BLOCKSIZE=blocksize, BLOCKSIZE2=256, DOUBLE_QUANT=dq,
                                  HAS_BIAS=bias, HAS_LORA=lora, stride_xk=1, stride_b=1)
                        if kernel == "fma":
                            ce.update(ROWS=rows, EVEN_K=even)
                        else:
                            ce.update(DOT_FP32=False, DOT_PRECISION=_precision(dt))
                        types = dict(_scale_types(dq), words_ptr="*i32", x_ptr=DTYPES[dt],
                                     bias_ptr=DTYPES[dt], y_ptr=DTYPES[dt], partial_ptr="*fp32",
                                     count_ptr="*i32", M="i32", N="i32",
                                     K="i32", stride_wn="i32", stride_xm="i32",
                                     h_ptr=DTYPES[dt], lora_b_ptr=DTYPES[dt], scaling="fp32",
                                     R="i32", stride_hm="i32", stride_bn="i32", stride_br="i32")
                        types = {k: v for k, v in types.items() if k in fn.arg_names}
                        div = [d for d in ["x_ptr", "words_ptr", "bias_ptr", "y_ptr", "partial_ptr",
                                           "count_ptr", "N", "K", "stride_wn", "stride_xm",
                                           *_MATMUL_POINTERS[1:]] if d in fn.arg_names]
                        label = (f"{cfg_label}" + (f" rows={rows}" if kernel == "fma" else "")
                                 + f" {dt} aligned bs={blocksize} dq={int(dq)} bias={int(bias)}"
                                 + (" lora=1" if lora else "") + ("" if even else " even_k=0"))
                        out.append(Variant(f"gemv_{kernel}", label, KERNEL_MODULES[name], name,
                                           _sig(fn, types, ce), ce, div, cfg.num_warps,
                                           cfg.num_stages))
    return out


def words_matmul_variants(family: str, configs, dtypes, dq_opts, bias_opts=(False,),
                          blocksize: int = 64) -> list[Variant]:
    """The word-decoding fused GEMM (``family`` "gemm_words") and grad-input
    ("grad_input_words"), K % blocksize == 0; configs carry BLOCK_M/N/K, the
    split (SPLIT_K / SPLIT_N) and GROUP_M."""
    from qlora_triton.ops import tuned_sm90

    name = "_nf4_gemm_words_kernel" if family == "gemm_words" else "_nf4_grad_input_words_kernel"
    fn = _kernel(name)
    forward = family == "gemm_words"
    out = []
    for cfg in configs:
        kw = cfg.kwargs
        tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        extra = ",".join(f"{k}={v}" for k, v in kw.items() if not k.startswith("BLOCK_"))
        # Only what the launcher and the autotune pruner can run.
        for dt in [d for d in dtypes if tuned_sm90.gemm_allowed(cfg, blocksize, d == "fp32")]:
            for dq in dq_opts:
                for bias in (bias_opts if forward else (False,)):
                    ce = dict(kw, BLOCKSIZE=blocksize, BLOCKSIZE2=256, DOUBLE_QUANT=dq, DOT_FP32=False,
                              DOT_PRECISION=_precision(dt))
                    types = dict(_scale_types(dq), words_ptr="*i32", partial_ptr="*fp32",
                                 count_ptr="*i32", M="i32", N="i32", K="i32", stride_wn="i32")
                    if forward:
                        types.update(x_ptr=DTYPES[dt], bias_ptr=DTYPES[dt], y_ptr=DTYPES[dt],
                                     stride_xm="i32")
                        ce.update(stride_xk=1, stride_b=1, HAS_BIAS=bias)
                        div = ["x_ptr", "bias_ptr", "y_ptr", "stride_xm"]
                    else:
                        types.update(gy_ptr=DTYPES[dt], gx_ptr=DTYPES[dt], stride_gm="i32")
                        ce["stride_gn"] = 1
                        div = ["gy_ptr", "gx_ptr", "stride_gm"]
                    div += ["words_ptr", "partial_ptr", "count_ptr", "N", "K", "stride_wn",
                            *_MATMUL_POINTERS[1:]]
                    label = (f"{tile} w{cfg.num_warps} s{cfg.num_stages} {extra} {dt} aligned "
                             f"bs={blocksize} dq={int(dq)}" + (f" bias={int(bias)}" if forward else ""))
                    out.append(Variant(family, label, KERNEL_MODULES[name], name,
                                       _sig(fn, types, ce), ce, div, cfg.num_warps, cfg.num_stages))
    return out


def matmul_variants(subset: bool = False) -> list[Variant]:
    from qlora_triton.ops import tuned_sm90

    general = {op: tuned_sm90.general_configs(op) for op in ("forward", "grad_input", "gemv")}
    half = [d for d in DTYPES if d != "fp32"]
    if not subset:
        # Every word-GEMV tile the table has at its full K tile (256 columns,
        # any blocksize) with splits 1 and 2 (a split changes only the epilogue:
        # one code path for every split > 1), plus the config the launcher
        # ships for each profiled shape, each with and without the LoRA fold.
        shapes = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192),
                  (28672, 8192), (8192, 28672)]

        def unique(cfgs):
            seen, out = set(), []
            for c in cfgs:
                key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append(c)
            return out

        words = {k: unique([c for c in tuned_sm90.gemv_configs(k)
                            if c.kwargs["BLOCK_K"] == tuned_sm90._BLOCK_K[k]
                            and c.kwargs["SPLIT_K"] <= 2]
                           + [tuned_sm90.gemv_config(k, n, kk) for n, kk in shapes])
                 for k in ("fma", "dot")}
        # Blocksize 32 under the tensor-core GEMV's 256-column K tile: two
        # scales per lane and row (ops/gemv.py, SH).
        k32 = [c for c in tuned_sm90.gemv_configs("dot") if c.kwargs["BLOCK_K"] == 256
               and c.kwargs["SPLIT_K"] <= 2]
        return (gemv_words_variants("fma", words["fma"], DTYPES, (True, False), (True, False),
                                    lora_opt=True)
                + gemv_words_variants("dot", words["dot"], DTYPES, (True, False), (True, False),
                                      lora_opt=True)
                + gemv_words_variants("dot", k32, ["bf16"], (True, False), (True, False),
                                      blocksize=32)
                + sum((_matmul_variants("_nf4_gemm_kernel", "gemm", g["forward"], dts, (False,),
                                        (True, False), (True, False))
                       + _matmul_variants("_nf4_gemv_kernel", "gemv",
                                          [c for c in g["gemv"] if c.kwargs["SPLIT_K"] <= 2], dts,
                                          (False,), (True, False), (True, False))
                       + _matmul_variants("_nf4_grad_input_kernel", "grad_input", g["grad_input"],
                                          dts, (False,), (True, False), (None,))
                       for g, dts in ((general, DTYPES),)), [])
                + words_matmul_variants("gemm_words", tuned_sm90.gemm_configs("forward"), half,
                                        (True, False), (True, False))
                + words_matmul_variants("gemm_words", tuned_sm90.gemm_configs("forward", True),
                                        ["fp32"], (True, False), (True, False))
                + words_matmul_variants("grad_input_words", tuned_sm90.gemm_configs("grad_input"),
                                        half, (True, False))
                + words_matmul_variants("grad_input_words",
                                        tuned_sm90.gemm_configs("grad_input", True), ["fp32"],
                                        (True, False)))
    # The word-decoding GEMVs with their widest tiles, split (the larger epilogue).
    out = []
    for kernel in ("fma", "dot"):
        widest = max(tuned_sm90.gemv_configs(kernel), key=lambda c: (c.kwargs["BLOCK_N"],
                                                                     c.kwargs["BLOCK_K"],
                                                                     c.kwargs["SPLIT_K"]))
        out += gemv_words_variants(kernel, [widest], ["bf16", "fp32"], [True, False], [True],
                                   lora_opt=True)
    if not any(v.family == "gemv_dot" and " fp32 " in v.label for v in out):
        # The widest dot tile takes no fp32 x: the one fp32 x gets.
        out += gemv_words_variants("dot", [tuned_sm90.gemv_config("dot", 8192, 8192, 64, True)],
                                   ["fp32"], [True, False], [True], lora_opt=True)
    out += gemv_words_variants("dot", [tuned_sm90.gemv_config("dot", 8192, 8192, 32)], ["bf16"],
                               [True], [True], blocksize=32)
    # The word GEMMs: each op's tallest shipped tile (bf16, double quant), and
    # its split 64-row tile for fp32 x (the most registers).
    for op, family in (("forward", "gemm_words"), ("grad_input", "grad_input_words")):
        tall = tuned_sm90.gemm_config(op, 4096, 4096, 4096)
        split = tuned_sm90.gemm_config(op, 64, 4096, 4096, x_fp32=True)
        out += words_matmul_variants(family, [tall], ["bf16"], [True], [True])
        out += words_matmul_variants(family, [split], ["fp32"], [False], [True])
    # The per-element decode: each kernel's shipped (widest) tile, every
    # constexpr branch once (double quant on/off, bf16 and fp32).
    for dt, dq in [("bf16", True), ("bf16", False), ("fp32", True), ("fp32", False)]:
        out += _matmul_variants("_nf4_gemm_kernel", "gemm", general["forward"][:1], [dt], [False],
                                [dq], [dq])
        out += _matmul_variants("_nf4_gemv_kernel", "gemv",
                                [tuned_sm90.general_config("gemv", 4096, 4104)],
                                [dt], [False], [dq], [dq])
        out += _matmul_variants("_nf4_grad_input_kernel", "grad_input", general["grad_input"][:1],
                                [dt], [False], [dq], [None])
    return out


# --------------------------------------------------------------------------- quantize / dequantize
def quantization_variants(subset: bool = False) -> list[Variant]:
    from qlora_triton.ops import dequantize as dq_mod
    from qlora_triton.ops import quantize as q_mod

    out = []
    blocksizes = (64, 256) if subset else (32, 64, 128, 256, 512, 1024, 2048, 4096)
    dtypes = ("bf16", "fp32") if subset else tuple(DTYPES)
    for dt in dtypes:
        for bs in blocksizes:
            # The launchers' tile: max(1, _TILE // blocksize) blocks per program.
            ce = dict(BLOCKSIZE=bs, BLOCKS_PER_PROG=max(1, q_mod._TILE // bs))
            for name, fam, q_type in [("_nf4_quantize_kernel", "nf4_quantize", "*u8"),
                                      ("_blockwise_8bit_quantize_kernel", "blockwise_8bit_quantize",
                                       "*u8")]:
                fn = getattr(q_mod, name)
                out_ptr = "packed_ptr" if fam == "nf4_quantize" else "q_ptr"
                types = {"x_ptr": DTYPES[dt], "bounds_ptr": "*fp32", out_ptr: q_type,
                         "absmax_ptr": "*fp32", "n": "i32", "nblocks": "i32"}
                out.append(Variant(fam, f"{dt} blocksize={bs} per_prog={ce['BLOCKS_PER_PROG']}",
                                   q_mod.__name__, name, _sig(fn, types, ce), ce,
                                   ["x_ptr", "bounds_ptr", out_ptr, "absmax_ptr", "n"]))
    dq_blocks = ((64, True), (64, False)) if subset else tuple(
        (bs, dq) for bs in (32, 64, 128, 256) for dq in (True, False))
    for dt in dtypes:
        for bs, dq in dq_blocks:
            ce = dict(BLOCKSIZE=bs, BLOCKSIZE2=256, DOUBLE_QUANT=dq, ROWS=dq_mod._ROWS)
            out.append(dequantize_variant(dt, bs, dq))
        for bs in ((256,) if subset else (64, 256, 2048)):
            # blockwise_8bit_dequantize's GPU tile (a literal in the launcher).
            ce = dict(BLOCKSIZE=bs, TILE=4096)
            fn = dq_mod._blockwise_8bit_dequantize_kernel
            types = dict(q_ptr="*u8", code_ptr="*fp32", absmax_ptr="*fp32", out_ptr=DTYPES[dt], n="i32")
            out.append(Variant("blockwise_8bit_dequantize", f"{dt} blocksize={bs} tile=4096",
                               dq_mod.__name__, "_blockwise_8bit_dequantize_kernel",
                               _sig(fn, types, ce), ce, ["q_ptr", "code_ptr", "absmax_ptr", "out_ptr", "n"]))
    return out


def dequantize_variant(dt: str, blocksize: int, double_quant: bool) -> Variant:
    """``_nf4_dequantize_kernel`` as ``nf4_dequantize`` launches it on the GPU."""
    from qlora_triton.ops import dequantize as dq_mod

    ce = dict(BLOCKSIZE=blocksize, BLOCKSIZE2=256, DOUBLE_QUANT=double_quant, ROWS=dq_mod._ROWS)
    fn = dq_mod._nf4_dequantize_kernel
    types = dict(_scale_types(double_quant), out_ptr=DTYPES[dt], n="i32", nbytes="i32")
    return Variant("nf4_dequantize", f"{dt} blocksize={blocksize} dq={int(double_quant)} "
                   f"rows={dq_mod._ROWS}", dq_mod.__name__, "_nf4_dequantize_kernel",
                   _sig(fn, types, ce), ce, _MATMUL_POINTERS + ["out_ptr", "n", "nbytes"],
                   num_warps=dq_mod._NUM_WARPS)


# --------------------------------------------------------------------------- optimizer
def optimizer_variants(subset: bool = False) -> list[Variant]:
    from qlora_triton.ops import optimizer as opt

    fn = opt._adamw_step_kernel
    out = []
    for dt in (("bf16", "fp32") if subset else tuple(DTYPES)):
        for eight_bit in (False, True):
            ce = dict(QBLOCK=opt.QBLOCK, QBLOCKS_PER_PROG=opt._TILE // opt.QBLOCK, EIGHT_BIT=eight_bit,
                      REPORT=eight_bit)  # what PagedAdamW8bit launches
            state = "*u8" if eight_bit else "*fp32"
            types = dict(param_ptr=DTYPES[dt], grad_ptr=DTYPES[dt], exp_avg_ptr=state,
                         exp_avg_sq_ptr=state, exp_avg_absmax_ptr="*fp32",
                         exp_avg_sq_absmax_ptr="*fp32", signed_code_ptr="*fp32",
                         signed_bounds_ptr="*fp32", unsigned_code_ptr="*fp32",
                         unsigned_bounds_ptr="*fp32", nonfinite_ptr="*i32", n="i32")
            for s in ("decay", "beta1_weight", "beta2", "beta2_weight", "neg_step_size",
                      "bias_correction2_sqrt", "eps"):
                types[s] = "fp32"
            ptrs = [k for k, v in types.items() if v.startswith("*")]
            out.append(Variant("adamw", f"{dt} {'8-bit' if eight_bit else '32-bit'} "
                               f"per_prog={ce['QBLOCKS_PER_PROG']}",
                               opt.__name__, "_adamw_step_kernel", _sig(fn, types, ce), ce, ptrs,
                               num_warps=opt._NUM_WARPS))
    return out


# The decode shapes of the static profile (scripts/sm90_sass.py SHAPES).
PROFILE_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192),
                  (28672, 8192), (8192, 28672)]


def shipped_variants() -> list[Variant]:
    """What the launchers ship for the profiled decode shapes: each word GEMV's
    config (every dtype, double quant, with a bias, and with the LoRA fold; the
    FMA kernel with and without EVEN_K),
    and the dequantize kernel (every dtype, blocksize 64, double quant on/off)."""
    from qlora_triton.ops import tuned_sm90

    out = []
    for kernel in ("fma", "dot"):
        seen = []
        for n, k in PROFILE_SHAPES:
            for fp32 in (False, True):
                cfg = tuned_sm90.gemv_config(kernel, n, k, 64, fp32)
                key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages, fp32)
                if key in seen:
                    continue
                seen.append(key)
                dtypes = ["fp32"] if fp32 else ["bf16", "fp16"]
                out += gemv_words_variants(kernel, [cfg], dtypes, [True], [True], lora_opt=True,
                                           even_k_opts=(True, False))
    out += [dequantize_variant(dt, 64, dq) for dt in DTYPES for dq in (True, False)]
    return out


def all_variants(subset: bool = False, shipped: bool = False) -> list[Variant]:
    _require_compiled_mode()
    if shipped:
        return shipped_variants()
    return matmul_variants(subset) + quantization_variants(subset) + optimizer_variants(subset)


# --------------------------------------------------------------------------- compile
def find_ptxas() -> str | None:
    """The ptxas Triton itself uses for sm_90 (bundled), else one on PATH / CUDA."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.path.exists(env):
        return env
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(ARCH)
        except TypeError:  # older Triton: no arch argument
            tool = get_ptxas()
        if tool is not None and os.path.exists(tool.path):
            return tool.path
    except Exception:  # noqa: BLE001 - any failure here means "look elsewhere"
        pass
    for cand in [shutil.which("ptxas"), *sorted(Path("/usr/local").glob("cuda*/bin/ptxas"))]:
        if cand and os.path.exists(cand):
            return str(cand)
    return None


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_usage(ptx: str, ptxas: str) -> dict:
    """Registers / spill / stack bytes from ``ptxas -v`` for sm_90a."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{ARCH}a", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    log = r.stderr + r.stdout
    if r.returncode != 0:
        return {"ptxas_error": log[-2000:]}
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    regs, spill, stack = _REGS.search(log), _SPILL.search(log), _STACK.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def compile_kernel(v: Variant):
    """Compile ``v`` for sm_90; returns Triton's compiled kernel (``.asm`` holds
    "ptx" and "cubin", ``.metadata.shared`` the shared memory) and the ptxas log."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(getattr(importlib.import_module(v.module), v.kernel))
    attrs = {(fn.arg_names.index(a),): _DIV16 for a in v.divisible}
    src = ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    # Triton runs ptxas -v itself when it builds the cubin; keep its log
    # (the exact ptxas invocation of the GPU machine) instead of running
    # ptxas twice (a plain ``ptxas -v`` lacks Triton's flags and reports
    # other numbers). Always compile: a cache hit would run no ptxas.
    log = io.StringIO()
    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
    except (ImportError, AttributeError):  # older Triton: fall back to ptxas -v
        pass
    with contextlib.redirect_stdout(log):
        c = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                           options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    return c, log.getvalue()


def compile_variant(v: Variant, ptxas: str | None = None) -> dict:
    """Compile ``v`` for sm_90; returns a JSON-able result row."""
    row: dict[str, Any] = {"family": v.family, "label": v.label, "kernel": v.kernel,
                           "num_warps": v.num_warps, "num_stages": v.num_stages,
                           "constexprs": {k: v_ for k, v_ in v.constexprs.items()}}
    t0 = time.perf_counter()
    try:
        c, log = compile_kernel(v)
        row["ok"] = bool(c.asm.get("cubin"))
        row["shared"] = int(c.metadata.shared)
        row["smem_fits"] = row["shared"] <= SMEM_LIMIT
        usage = parse_ptxas_log(log)
        if usage["registers"] is None and ptxas:
            usage = ptxas_usage(c.asm["ptx"], ptxas)
        row.update(usage)
        if "ptxas_error" in row:
            row["ok"] = False
    except Exception as e:  # noqa: BLE001 - a compile failure is a result, not a crash
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {e}"[-4000:]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _worker(args):
    v, ptxas = args
    return compile_variant(v, ptxas)


def run(variants: list[Variant], jobs: int = 1, progress: bool = False,
        partial: Path | None = None) -> list[dict]:
    """Compile ``variants`` in ``jobs`` processes; rows in order. ``partial``: a
    JSON-lines file each row is appended to as it completes (a long run that
    is stopped still leaves its results)."""
    ptxas = find_ptxas()
    items = [(v, ptxas) for v in variants]
    sink = open(partial, "w") if partial else None  # noqa: SIM115 - closed below
    rows = []
    try:
        if jobs <= 1:
            results = map(_worker, items)
        else:
            pool = ProcessPoolExecutor(jobs)
            results = pool.map(_worker, items, chunksize=1)
        for i, r in enumerate(results):
            rows.append(r)
            if sink:
                sink.write(json.dumps(r) + "\n")
                sink.flush()
            if progress and ((i + 1) % 25 == 0 or jobs <= 1):
                print(f"[{i + 1}/{len(items)}] {r['family']} {r['label']}", file=sys.stderr)
        if jobs > 1:
            pool.shutdown()
    finally:
        if sink:
            sink.close()
    return rows


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    ptxas = find_ptxas()
    version = None
    if ptxas:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        version = out.strip().splitlines()[-1] if out.strip() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "git_commit": commit, "target": f"cuda sm_{ARCH} (warp 32)",
            "ptxas": ptxas, "ptxas_version": version, "python": sys.version.split()[0],
            "note": "compile facts (ahead-of-time, no GPU), not GPU measurements"}


def summarize(rows: list[dict]) -> list[dict]:
    """Per family: variant count, failures, max registers, spilling variants, max shared."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == fam]
        ok = [r for r in rs if r["ok"]]
        regs = [r["registers"] for r in ok if r.get("registers") is not None]
        out.append({"family": fam, "variants": len(rs), "failures": len(rs) - len(ok),
                    "max_registers": max(regs) if regs else None,
                    "spilling": sum(1 for r in ok if (r.get("spill_stores") or 0) > 0),
                    "max_spill_stores": max((r.get("spill_stores") or 0 for r in ok), default=0),
                    "max_shared": max((r.get("shared", 0) for r in ok), default=0),
                    "over_smem_limit": sum(1 for r in ok if not r.get("smem_fits", True))})
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'family':26} {'variant':58} {'ok':3} {'regs':>4} {'spill st/ld':>12} {'smem':>7}"]
    for r in rows:
        spill = f"{r.get('spill_stores', '-')}/{r.get('spill_loads', '-')}"
        lines.append(f"{r['family']:26} {r['label']:58} {'y' if r['ok'] else 'N':3} "
                     f"{str(r.get('registers', '-')):>4} {spill:>12} {r.get('shared', '-'):>7}")
        if not r["ok"]:
            lines.append("    " + (r.get("error") or r.get("ptxas_error", "")).splitlines()[-1][:200]
                         if (r.get("error") or r.get("ptxas_error")) else "    (no cubin)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", action="store_true", help="one config per constexpr branch (the CI set)")
    p.add_argument("--shipped", action="store_true", help="the configs the launchers ship for the "
                   "profiled decode shapes (word GEMVs with bias and LoRA fold, the dequantize)")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON here ('-': stdout)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--filter", default="", help="only variants whose family or label contains this")
    p.add_argument("--quiet", action="store_true", help="summary only, no per-variant table")
    p.add_argument("--range", default=":", metavar="A:B",
                   help="only variants A..B-1 of the enumeration (split a long run over processes)")
    p.add_argument("--merge", nargs="+", metavar="JSONL",
                   help="compile nothing: build the report from these partial files (rows of runs "
                        "over disjoint --range slices, in enumeration order)")
    p.add_argument("--resume", nargs="+", metavar="JSONL",
                   help="partial files of a stopped run: their variants are not compiled again")
    args = p.parse_args(argv)
    variants = [v for v in all_variants(args.subset, args.shipped)
                if args.filter in f"{v.family} {v.label}"]
    a, b = (int(x) if x else None for x in args.range.split(":"))
    variants = variants[a:b]
    order = {(v.family, v.label): i for i, v in enumerate(variants)}
    done = []
    for f in args.resume or []:
        done += [json.loads(line) for line in Path(f).read_text().splitlines()]
    if done:  # rows of a stopped run: reuse those of variants still enumerated
        want = {(v.family, v.label) for v in variants}
        done = {(r["family"], r["label"]): r for r in done if (r["family"], r["label"]) in want}
        variants = [v for v in variants if (v.family, v.label) not in done]
    t0 = time.perf_counter()
    partial = Path(args.json + ".partial.jsonl") if args.json and args.json != "-" else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [json.loads(line) for f in args.merge for line in Path(f).read_text().splitlines()]
        partial = None
    else:
        rows = run(variants, args.jobs, progress=True, partial=partial)
        if done:
            rows = sorted([*done.values(), *rows], key=lambda r: order[(r["family"], r["label"])])
    env = dict(environment(), wall_seconds=round(time.perf_counter() - t0, 1), subset=args.subset,
               shipped=args.shipped,
               compile_seconds=round(sum(r["seconds"] for r in rows), 1))
    summary = summarize(rows)
    if not args.quiet:
        print(format_table(rows))
    print(json.dumps(env, indent=1))
    for s in summary:
        print(s)
    report = {"environment": env, "summary": summary, "variants": rows}
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        if partial:
            partial.unlink(missing_ok=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
