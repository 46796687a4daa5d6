"""Step time without a GPU: a roofline sum over the ops of one training step.

A ``TorchDispatchMode`` watches one forward + backward of a ``--preset``
model on the meta device and, for every op that would launch a GPU kernel,
adds::

    max(flops / FLOPS, bytes / BANDWIDTH) + LAUNCH_SECONDS

* ``FLOPS`` = 790e12: bf16 dense matmul on the H200, measured (GPU.md);
* ``BANDWIDTH`` = 4.3e12 bytes/s: the H200's device copy, measured (GPU.md);
* ``LAUNCH_SECONDS`` = 4e-6: an assumed cost per kernel-launching op (the
  gap between back-to-back small kernels in eager PyTorch is a few
  microseconds); not measured here, and it is the constant the fused blocks
  are about, so the table prints the launches too.

flops come from ``torch.utils.flop_counter``'s formulas (matmuls and the
attention kernels; elementwise ops count bytes only, which bind them anyway);
bytes are every input tensor read and every output written. An op that
launches nothing (a view, ``detach``, a bare ``empty``) costs nothing. The
package's NF4 matmuls (``qlora_triton::nf4_matmul``, its grad-input, the
LoRA layer's ``nf4_lora_matmul`` and the fused blocks' stacked ``_cat`` ops) are
one op each, under the strategy the package itself picks for the shape (on
meta: the sm_90 rows of its crossover table): "gemv"/"fused" read the packed
weights and constants once (the same flops as a bf16 matmul, about a quarter
of the weight bytes); "dequant" adds a second launch that writes and reads
the dense weight. The roofline does not see that a fused NF4 GEMM runs below
cuBLAS's efficiency: where that matters the strategy table picks "dequant".

The 16-bit LoRA row is PEFT's LoRA (fp32 adapters: it casts each layer's input
to fp32 and back), so its extra bytes are PEFT's as much as the dense weights'.

The model: the preset's shapes, bf16, gradient checkpointing (the recompute is
counted), the same options for each row: QLoRA (NF4 + LoRA, ``qt``), QLoRA
with the fused blocks (``qt.fuse``, where the package has it), and 16-bit
LoRA (PEFT on a dense bf16 model). These are estimates: no memory-system
contention, no overlap between kernels, no CPU-side overhead beyond the
launch constant.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .. import strategy as strategy_mod
from ..training import enable_checkpointing

FLOPS = 790e12
BANDWIDTH = 4.3e12
LAUNCH_SECONDS = 4e-6

_NO_KERNEL = {"detach", "alias", "lift_fresh", "_unsafe_view", "empty", "empty_strided", "empty_like",
              "new_empty", "new_empty_strided", "empty_permuted", "view", "t", "transpose", "permute",
              "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided", "split", "unbind",
              "_reshape_alias", "split_with_sizes", "unfold"}
# ops whose args[0] is the activation and whose output is the product through
# NF4 weights (the ``_cat`` ops: several weights stacked along N; the ``lora``
# op adds the rank-r update ``h @ B.T`` too)
_NF4_OPS = {"nf4_matmul", "nf4_matmul_grad_input", "nf4_lora_matmul", "nf4_matmul_cat",
            "nf4_matmul_grad_input_cat"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _launches(func) -> bool:
    name = func._schema.name.split("::", 1)[1]
    if name in _NO_KERNEL:
        return False
    returns = func._schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class StepCost(TorchDispatchMode):
    """Sums the roofline time of the ops run inside it; ``by_op`` per op name."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = self.flops = self.bytes = 0.0
        self.launches = 0
        self.by_op: collections.Counter = collections.Counter()

    def _add(self, name: str, flops: float, nbytes: float) -> None:
        seconds = max(flops / FLOPS, nbytes / BANDWIDTH) + LAUNCH_SECONDS
        self.seconds += seconds
        self.flops += flops
        self.bytes += nbytes
        self.launches += 1
        self.by_op[name] += seconds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        nf4 = func.namespace == "qlora_triton" and func._schema.name.split("::", 1)[1] in _NF4_OPS
        before = strategy_mod.strategies.copy() if nf4 else None
        out = func(*args, **kwargs)  # qlora_triton ops run below the mode: one op each
        if nf4:
            x, y = args[0], out
            k, n = x.shape[-1], y.shape[-1]
            weight = sum(_nbytes(a) for a in args[1:] if isinstance(a, torch.Tensor))
            flops = 2.0 * (x.numel() // k) * n * k
            if func._schema.name.endswith("nf4_lora_matmul"):
                h = kwargs.get("h", args[8])  # [M, r]
                flops += 2.0 * (x.numel() // k) * n * h.shape[-1]
            self._add(func._schema.name, flops, _nbytes(x) + _nbytes(y) + weight)
            if any(s == "dequant" for (_, s) in strategy_mod.strategies - before):
                # the "dequant" strategy: the NF4 -> bf16 kernel writes W, the GEMM reads it
                # (a second launch, counted here; the GEMM's own launch is the one above)
                self._add(func._schema.name + "[dequant]", 0.0, 2 * n * k * x.element_size())
            return out
        if not _launches(func):
            return out
        tensors_in = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in tensors_in) + sum(_nbytes(t) for t in tensors_out)
        flops = 0
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
        self._add(str(func._overloadpacket), flops, nbytes)
        return out

    def result(self) -> dict:
        top = self.by_op.most_common(6)
        return {"seconds": self.seconds, "flops": self.flops, "bytes": self.bytes, "launches": self.launches,
                "top_ops": {k: v for k, v in top}}


def _dense_lora(shape, r: int, alpha: float, dtype: torch.dtype):
    """16-bit LoRA on the same shapes: a dense bf16 LLaMA on meta with PEFT's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from .model import LLAMA_LINEARS, llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LLAMA_LINEARS),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _one_step(model, vocab: int, batch_size: int, seq_len: int, liger: bool, offload: bool) -> dict:
    from ..liger import apply_liger
    from ..offload import offload_checkpoints
    from . import meta_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_checkpointing(base)
    base.config.use_cache = False
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    if liger:
        apply_liger(base, "meta")
    if offload:
        offload_checkpoints(base)
    meta_attention.use_on(base)
    batch = torch.randint(0, vocab, (batch_size, seq_len), device="meta")
    mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device="meta")
    with StepCost() as cost:
        loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
        loss.backward()
    return cost.result()


def estimate_step(preset: str, batch_size: int = 1, seq_len: int = 2048, r: int = 16, alpha: float = 16.0,
                  liger: bool = True, offload: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"rows": {"qlora", "qlora_fused", "lora16"}: StepCost.result()}`` and the
    constants, for one forward + backward of ``preset`` on meta."""
    import qlora_triton as qt

    from .presets import LLAMA_SHAPES, build_quantized_llama

    if preset not in LLAMA_SHAPES:
        raise ValueError(f"preset: expected one of {sorted(LLAMA_SHAPES)}, got {preset!r}")
    shape = LLAMA_SHAPES[preset]
    rows = {}
    model = build_quantized_llama(shape, torch.device("meta"), r, alpha, dtype=dtype)
    rows["qlora"] = _one_step(model, shape.vocab_size, batch_size, seq_len, liger, offload)
    model = qt.fuse(build_quantized_llama(shape, torch.device("meta"), r, alpha, dtype=dtype))
    rows["qlora_fused"] = _one_step(model, shape.vocab_size, batch_size, seq_len, liger, offload)
    del model
    rows["lora16"] = _one_step(_dense_lora(shape, r, alpha, dtype), shape.vocab_size, batch_size, seq_len,
                               liger, offload)
    return {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "r": r, "liger": liger,
            "offload": offload, "constants": {"flops_per_s": FLOPS, "bytes_per_s": BANDWIDTH,
                                              "launch_seconds": LAUNCH_SECONDS},
            "kind": "estimate (roofline sum on meta, no GPU)", "rows": rows}


def format_estimate(result: dict) -> str:
    c = result["constants"]
    lines = [f"preset {result['preset']}: ESTIMATED step time, forward + backward, {result['batch_size']} x "
             f"{result['seq_len']} tokens, r {result['r']}, bf16, gradient checkpointing"
             f"{', liger' if result['liger'] else ''}{', offload' if result['offload'] else ''}; per op "
             f"max(flops / {c['flops_per_s']:.3g} flop/s, bytes / {c['bytes_per_s']:.3g} B/s) + "
             f"{c['launch_seconds'] * 1e6:.0f} us per kernel-launching op (estimates, not measurements)"]
    base = result["rows"]["lora16"]["seconds"]
    names = {"qlora": "QLoRA (qt, unfused)", "qlora_fused": "QLoRA (qt, fused blocks)",
             "lora16": "16-bit LoRA (PEFT, bf16)"}
    for key, row in result["rows"].items():
        lines.append(f"  {names[key]:26s} {row['seconds'] * 1e3:8.1f} ms  ({row['seconds'] / base:.2f}x 16-bit "
                     f"LoRA)  {row['flops'] / 1e12:7.1f} TFLOP  {row['bytes'] / 1e9:7.1f} GB  "
                     f"{row['launches']:6d} launches")
    return "\n".join(lines)
