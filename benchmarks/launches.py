"""Counting the kernel launches of a call, on any device, without a GPU.

A *kernel-launching op* (the unit of ``benchmarks/bench_host.py`` and
``tests/test_host_path.py``) is one of:

* an ATen op that reaches the dispatcher below autograd, except views (the
  schema's outputs alias an input), metadata ops (``detach``, ``alias`` ...)
  and allocations without a fill (``empty*``): on CUDA each of the rest
  launches at least one kernel (a copy, a fill, a GEMM);
* a Triton kernel launch of ``qlora_triton`` (a ``JITFunction.run``, or
  ``InterpretedFunction.run`` under TRITON_INTERPRET=1, with ``warmup=False``:
  the one call every launch path ends in, autotuned or not).

A ``qlora_triton::*`` op is not counted itself: its implementation runs with
counting still on, so the fills, casts and Triton kernels inside it are what
is counted. Another library's op (``bitsandbytes::dequantize_4bit``) counts
as one launch, under its own namespace.

On the meta device (tensor accounting, :mod:`qlora_triton.ops.meta`) our
Triton launches are skipped before they reach ``JITFunction.run``; they are
counted where they are skipped, so a meta run counts what a GPU run of the
same shapes would launch, with the strategy the GPU would choose.

``python -m benchmarks.launches`` counts one decoder layer, forward +
backward, of a 7B-shaped LLaMA at 1 x 2048 tokens: qlora_triton fused
(:func:`qlora_triton.fuse`), unfused, and PEFT + bitsandbytes (see
:func:`main`).
"""

from __future__ import annotations

import collections
import contextlib
import sys
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_NO_KERNEL = {"detach", "alias", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_same_size", "empty", "empty_strided", "empty_like",
              "new_empty", "new_empty_strided", "empty_permuted"}
_LEAF_LAUNCHERS = (JITFunction, InterpretedFunction)


def launches_nothing(func: torch._ops.OpOverload) -> bool:
    """Whether ATen op ``func`` is a view, a metadata op or a bare allocation."""
    if func._schema.name.split("::", 1)[1] in _NO_KERNEL:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _CountAten(TorchDispatchMode):
    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qlora_triton":
            # Run the op's own implementation (the backend key, below this
            # mode) with counting on, so what it launches is counted.
            device = next(a for a in args if isinstance(a, torch.Tensor)).device
            keys = torch._C.DispatchKeySet(torch._C._dispatch_key_for_device(device.type))
            with _CountAten(self.counts):
                return func.redispatch(keys, *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Below autograd (inside our ops) composite ops such as ``to`` and
            # ``reshape`` arrive whole: count what they decompose into.
            with _CountAten(self.counts):
                return func.decompose(*args, **kwargs)
        if not launches_nothing(func):
            namespace, name = func._schema.name.split("::", 1)
            self.counts[f"{'aten' if namespace == 'aten' else namespace}.{name}"] += 1
        return func(*args, **kwargs)


def _kernel_name(kernel) -> str | None:
    fn = kernel.fn
    module = getattr(fn, "__module__", "") or ""
    return fn.__name__.strip("_") if module.startswith("qlora_triton") else None


@contextlib.contextmanager
def _patched_launches(counts: collections.Counter | None, run_kernels: bool) -> Iterator[None]:
    originals = {cls: cls.__dict__["run"] for cls in _LEAF_LAUNCHERS}

    def wrap(cls):
        real = originals[cls]

        def run(self, *args, grid, warmup, **kwargs):
            name = _kernel_name(self)
            if name is None or warmup:
                return real(self, *args, grid=grid, warmup=warmup, **kwargs)
            if counts is not None:
                counts["triton." + name] += 1
            if run_kernels:
                # The interpreter's own tensor work is not a launch.
                with _disable_current_modes():
                    return real(self, *args, grid=grid, warmup=warmup, **kwargs)
            if callable(grid):  # the launcher's grid lambda still runs
                grid(kwargs)
            return None
        return run

    def meta_getitem(self, grid):  # ops/meta.py's skip, counting what it skips
        launch = meta_ops._original_getitem(self, grid)

        def run(*args, **kwargs):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
                name = _kernel_name(_leaf(self))
                if counts is not None and name is not None:
                    counts["triton." + name] += 1
                return None
            return launch(*args, **kwargs)
        return run

    from qlora_triton.ops import meta as meta_ops

    original_meta = meta_ops._getitem
    for cls in _LEAF_LAUNCHERS:
        cls.run = wrap(cls)
    meta_ops._getitem = meta_getitem
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run
        meta_ops._getitem = original_meta


def _leaf(kernel):
    """The ``JITFunction`` under an autotuner or heuristics wrapper."""
    while not isinstance(kernel, _LEAF_LAUNCHERS) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def count_launches(run_kernels: bool = True) -> Iterator[collections.Counter]:
    """Count the kernel-launching ops (see the module docstring) inside the
    block, by name (``aten.<op>``, ``triton.<kernel>``); the block's calls run
    as usual (or, with ``run_kernels=False``, without launching any Triton
    kernel)."""
    counts: collections.Counter = collections.Counter()
    with _patched_launches(counts, run_kernels), _CountAten(counts):
        yield counts


@contextlib.contextmanager
def stub_triton_kernels() -> Iterator[None]:
    """Triton kernels of qlora_triton are not launched inside the block (their
    launcher's grid function still runs): host-time measurement without a GPU."""
    with _patched_launches(None, run_kernels=False):
        yield


# -- one decoder layer, three ways (python -m benchmarks.launches) ------------------
PROVIDERS = ("qlora_triton_fused", "qlora_triton", "peft_bitsandbytes")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
# The CPU run's width: 7B's ratios (head_dim 64 as 7B's is 128) at 1/8 of its
# width, so that bitsandbytes' CPU path and our launchers' real CPU tensors
# run in seconds. No provider's op sequence depends on the width at M = 2048:
# bitsandbytes dequantizes then multiplies at every M > 1, and our strategy
# table picks "dequant" from M = 1024 for small and large layers alike.
NARROW = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8)


def _layer_model(provider: str, width: dict, device: str, r: int):
    """A one-layer LlamaForCausalLM with bf16 compute and LoRA r on all seven
    projections, as ``provider`` builds it."""
    from qlora_triton.finetune.model import LLAMA_LINEARS, ModelShape
    from qlora_triton.finetune.presets import build_quantized_llama

    shape = ModelShape(**width, num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096)
    if provider in ("qlora_triton", "qlora_triton_fused"):
        import qlora_triton as qt

        model = build_quantized_llama(shape, torch.device(device), r=r, alpha=2 * r)
        for name, param in model.named_parameters():  # fp32 adapters on every device (as PEFT keeps them)
            if ".lora_" in name:
                param.data = param.data.float()
        return qt.fuse(model) if provider == "qlora_triton_fused" else model
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from qlora_triton.finetune.model import llama_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(shape)).to(torch.bfloat16)
    layer = model.model.layers[0]
    for name, module in list(layer.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_LINEARS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         blocksize=64, compress_statistics=True)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, q.to(device))  # Params4bit quantizes on .to()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                             target_modules=list(LLAMA_LINEARS)))
    return model.base_model.model


def count_layer(provider: str, width: dict, device: str, tokens: int = 2048, r: int = 16) -> dict:
    """Kernel-launching ops of one decoder layer's forward and backward
    (input gradient on, as inside a stack; no checkpointing), bf16."""
    from qlora_triton.strategy import assume_gpu_kind

    torch.manual_seed(0)
    model = _layer_model(provider, width, device, r)
    layer = model.model.layers[0]
    x = torch.randn(1, tokens, width["hidden_size"], device=device, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens, device=device)[None]
    cos_sin = model.model.rotary_emb(x, positions)
    cos_sin = tuple(t.to(torch.bfloat16) for t in cos_sin)
    grad = torch.randn_like(x)
    stub = provider != "peft_bitsandbytes" and device == "cpu"
    # The GPU's strategy (sm_90 table) on any device; our kernels are not run on
    # the CPU (only counted): the launchers' own torch ops run for real.
    with assume_gpu_kind("sm_90"):
        with count_launches(run_kernels=not stub) as forward:
            y = layer(x, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
            y = y[0] if isinstance(y, tuple) else y
        with count_launches(run_kernels=not stub) as backward:
            y.backward(grad)
    return {"forward": sum(forward.values()), "backward": sum(backward.values()),
            "total": sum(forward.values()) + sum(backward.values()),
            "forward_ops": dict(sorted(forward.items())), "backward_ops": dict(sorted(backward.items()))}


def count_blocks(provider: str, width: dict, device: str, tokens: int = 2048, r: int = 16) -> dict:
    """The same count for the parts :func:`qlora_triton.fuse` replaces: the
    MLP module, and q, k, v applied to one input, forward and backward."""
    from qlora_triton.strategy import assume_gpu_kind

    torch.manual_seed(0)
    model = _layer_model(provider, width, device, r)
    layer = model.model.layers[0]
    attn = layer.self_attn
    x = torch.randn(1, tokens, width["hidden_size"], device=device, dtype=torch.bfloat16, requires_grad=True)
    stub = provider != "peft_bitsandbytes" and device == "cpu"
    out = {}
    with assume_gpu_kind("sm_90"):
        for block, run in (("qkv", lambda: [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]),
                           ("mlp", lambda: [layer.mlp(x)])):
            outs = run()
            grads = [torch.randn_like(o) for o in outs]
            x.grad = None
            with count_launches(run_kernels=not stub) as forward:
                outs = run()
            with count_launches(run_kernels=not stub) as backward:
                torch.autograd.backward(outs, grads)
            out[block] = {"forward": sum(forward.values()), "backward": sum(backward.values()),
                          "total": sum(forward.values()) + sum(backward.values()),
                          "forward_ops": dict(sorted(forward.items())),
                          "backward_ops": dict(sorted(backward.items()))}
    return out


def main(argv=None) -> int:
    """Count per-layer launches (see the module docstring); print the tables,
    write ``launches.json`` (atomically) into ``--out``."""
    import argparse
    import platform
    import time

    from qlora_triton import backend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for launches.json")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not backend.INTERPRET:
        parser.error("run with TRITON_INTERPRET=1 (our launchers then run on CPU tensors, kernels stubbed)")
    runs = []
    for provider in PROVIDERS:
        places = [("cpu", NARROW)] + ([("meta", LLAMA_7B)] if provider != "peft_bitsandbytes" else [])
        for device, width in places:  # (bitsandbytes has no meta path)
            blocks = count_blocks(provider, width, device, args.tokens, args.r)
            layer = count_layer(provider, width, device, args.tokens, args.r)
            runs.append(dict(provider=provider, device=device, width=width, layer=layer, **blocks))
    print(f"{'provider':20s} {'device':6s} {'hidden':>6s} | {'q/k/v':>5s} {'mlp':>4s} {'both':>5s} | "
          f"{'layer fwd':>9s} {'bwd':>4s} {'total':>5s}")
    for run in runs:
        both = run["qkv"]["total"] + run["mlp"]["total"]
        print(f"{run['provider']:20s} {run['device']:6s} {run['width']['hidden_size']:6d} | "
              f"{run['qkv']['total']:5d} {run['mlp']['total']:4d} {both:5d} | {run['layer']['forward']:9d} "
              f"{run['layer']['backward']:4d} {run['layer']['total']:5d}")
    if args.out:
        from pathlib import Path

        import transformers
        import triton

        from qlora_triton.finetune.report import write_json

        meta = {"command": "TRITON_INTERPRET=1 python -m benchmarks.launches " + " ".join(argv),
                "date": time.strftime("%Y-%m-%d", time.gmtime()), "kind": "CPU count (no GPU, nothing timed)",
                "tokens": args.tokens, "batch": 1, "r": args.r, "dtype": "bfloat16", "strategy_table": "sm_90",
                "torch": torch.__version__, "triton": triton.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
        try:
            import bitsandbytes
            import peft

            meta.update(bitsandbytes=bitsandbytes.__version__, peft=peft.__version__)
        except ImportError:
            pass
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "launches.json", {"meta": meta, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
