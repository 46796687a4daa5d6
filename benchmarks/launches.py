"""Counting the kernel launches of a call, on any device, without a GPU.

A *kernel-launching op* (the unit of ``benchmarks/bench_host.py`` and
``tests/test_host_path.py``) is one of:

* an ATen op that reaches the dispatcher below autograd, except views (the
  schema's outputs alias an input), metadata ops (``detach``, ``alias`` ...)
  and allocations without a fill (``empty*``): on CUDA each of the rest
  launches at least one kernel (a copy, a fill, a GEMM);
* a Triton kernel launch of ``qlora_triton`` or of Liger-Kernel
  (``liger_kernel.*``: its RMSNorm and RoPE) (a ``JITFunction.run``, or
  ``InterpretedFunction.run`` under TRITON_INTERPRET=1, with ``warmup=False``:
  the one call every launch path ends in, autotuned or not). Liger's kernels
  do not run under the interpreter (:func:`qlora_triton.backend.use_liger`):
  there they are counted and never run, as ours are with ``run_kernels=False``.

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
(:func:`qlora_triton.fuse`), unfused, and PEFT + bitsandbytes, each with
transformers' own RMSNorm and RoPE and with Liger-Kernel's (applied by
:func:`qlora_triton.liger.liger_patch`, the call the CUDA path makes; see
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
    """``<kernel>`` for ours, ``liger.<kernel>`` for Liger-Kernel's, else None (not counted)."""
    fn = kernel.fn
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("qlora_triton"):
        return fn.__name__.strip("_")
    if module.startswith("liger_kernel"):
        return "liger." + fn.__name__.strip("_")
    return None


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
            if run_kernels and not (name.startswith("liger.") and isinstance(self, InterpretedFunction)):
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
# The parts of a layer counted alone (count_blocks); the layer's launches
# outside them are attention and the two residual adds (count_layer's "rest").
BLOCKS = ("qkv", "mlp", "o_proj", "norms_rope")


def _layer_model(provider: str, width: dict, device: str, r: int, liger: bool = False):
    """A one-layer LlamaForCausalLM with bf16 compute and LoRA r on all seven
    projections, as ``provider`` builds it; with ``liger``, patched by
    Liger-Kernel as :func:`qlora_triton.liger.apply_liger` patches a model on
    CUDA (call it inside :func:`qlora_triton.liger.modeling_modules_kept`)."""
    from qlora_triton.finetune.model import LLAMA_LINEARS, ModelShape
    from qlora_triton.finetune.presets import build_quantized_llama
    from qlora_triton.liger import liger_patch

    shape = ModelShape(**width, num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096)
    if provider in ("qlora_triton", "qlora_triton_fused"):
        import qlora_triton as qt

        model = build_quantized_llama(shape, torch.device(device), r=r, alpha=2 * r)
        for name, param in model.named_parameters():  # fp32 adapters on every device (as PEFT keeps them)
            if ".lora_" in name:
                param.data = param.data.float()
        model = qt.fuse(model) if provider == "qlora_triton_fused" else model
    else:
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
        model = model.base_model.model
    if liger:
        liger_patch(model)
    return model


def _summary(forward: collections.Counter, backward: collections.Counter) -> dict:
    return {"forward": sum(forward.values()), "backward": sum(backward.values()),
            "total": sum(forward.values()) + sum(backward.values()),
            "forward_ops": dict(sorted(forward.items())), "backward_ops": dict(sorted(backward.items()))}


def _stubbed(provider: str, device: str) -> bool:
    """Whether our Triton kernels are counted without running (bitsandbytes
    runs for real; Liger's kernels never run under the interpreter)."""
    return provider != "peft_bitsandbytes" and device == "cpu"


def count_layer(provider: str, width: dict, device: str, tokens: int = 2048, r: int = 16,
                liger: bool = False) -> dict:
    """Kernel-launching ops of one decoder layer's forward and backward
    (input gradient on, as inside a stack; no checkpointing), bf16."""
    from qlora_triton.liger import modeling_modules_kept
    from qlora_triton.strategy import assume_gpu_kind

    torch.manual_seed(0)
    with modeling_modules_kept():
        model = _layer_model(provider, width, device, r, liger)
        layer = model.model.layers[0]
        x = torch.randn(1, tokens, width["hidden_size"], device=device, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(tokens, device=device)[None]
        cos_sin = model.model.rotary_emb(x, positions)
        cos_sin = tuple(t.to(torch.bfloat16) for t in cos_sin)
        grad = torch.randn_like(x)
        stub = _stubbed(provider, device)
        # The GPU's strategy (sm_90 table) on any device; our kernels are not run on
        # the CPU (only counted): the launchers' own torch ops run for real.
        with assume_gpu_kind("sm_90"):
            with count_launches(run_kernels=not stub) as forward:
                y = layer(x, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
                y = y[0] if isinstance(y, tuple) else y
            with count_launches(run_kernels=not stub) as backward:
                y.backward(grad)
    return _summary(forward, backward)


def count_blocks(provider: str, width: dict, device: str, tokens: int = 2048, r: int = 16,
                 liger: bool = False) -> dict:
    """The same count for parts of the layer, each alone, forward and
    backward, on inputs laid out as inside the layer: ``qkv`` (q, k, v on one
    input: what :func:`qlora_triton.fuse` fuses), ``mlp``, ``o_proj``, and
    ``norms_rope`` (both RMSNorms, and RoPE on q and k as the attention block
    makes them: the outputs of q_proj and k_proj, as laid out (fused: columns
    of one tensor), viewed as heads; gradients in the layout attention's
    backward gives)."""
    from transformers.models.llama import modeling_llama

    from qlora_triton.liger import modeling_modules_kept
    from qlora_triton.strategy import assume_gpu_kind

    torch.manual_seed(0)
    out = {}
    with modeling_modules_kept():
        model = _layer_model(provider, width, device, r, liger)
        layer = model.model.layers[0]
        attn = layer.self_attn
        hidden, head_dim = width["hidden_size"], attn.head_dim
        bf16 = dict(device=device, dtype=torch.bfloat16)
        x = torch.randn(1, tokens, hidden, **bf16, requires_grad=True)
        z = torch.randn(1, tokens, attn.o_proj.in_features, **bf16, requires_grad=True)  # attention's output
        n1, n2 = (torch.randn(1, tokens, hidden, **bf16, requires_grad=True) for _ in range(2))
        positions = torch.arange(tokens, device=device)[None]
        cos, sin = (t.to(torch.bfloat16) for t in model.model.rotary_emb(x, positions))
        stub = _stubbed(provider, device)
        with torch.no_grad(), _patched_launches(None, run_kernels=not stub):
            q0, k0 = attn.q_proj(x), attn.k_proj(x)  # as attention views them (fused: columns of one tensor)
        q, k = (t.detach().requires_grad_() for t in (q0, k0))  # (detach keeps the strides)

        def heads(t):  # the attention block's view: its backward copies a gradient it cannot view back
            return t.view(1, tokens, -1, head_dim).transpose(1, 2)

        def rope_grad(t):  # attention's backward gives [1, T, heads, head_dim] storage
            return torch.randn(t.shape[0], t.shape[2], t.shape[1], t.shape[3], **bf16).transpose(1, 2)

        def trained(*modules):
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        # (outputs, what their gradients go to); the gradients are returned
        # (autograd.grad), not accumulated into leaves as .grad: inside the
        # layer these inputs are no leaves, and a leaf's accumulation copies a
        # gradient it cannot take over (Liger's RMSNorm writes its input
        # gradient over the output gradient, which the caller still holds).
        runs = {
            "qkv": lambda: ([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)],
                            [x, *trained(attn.q_proj, attn.k_proj, attn.v_proj)]),
            "mlp": lambda: ([layer.mlp(x)], [x, *trained(layer.mlp)]),
            "o_proj": lambda: ([attn.o_proj(z)], [z, *trained(attn.o_proj)]),
            # the module's global at call time: Liger's function once it is patched
            "norms_rope": lambda: ([layer.input_layernorm(n1), layer.post_attention_layernorm(n2),
                                    *modeling_llama.apply_rotary_pos_emb(heads(q), heads(k), cos, sin)],
                                   [n1, n2, q, k, *trained(layer.input_layernorm, layer.post_attention_layernorm)]),
        }
        with assume_gpu_kind("sm_90"), _patched_launches(None, run_kernels=not stub):  # (warm-ups too)
            for block, run in runs.items():
                outs, _ = run()
                grads = [rope_grad(o) if o.dim() == 4 else torch.randn_like(o) for o in outs]
                with count_launches(run_kernels=not stub) as forward:
                    outs, inputs = run()
                with count_launches(run_kernels=not stub) as backward:
                    torch.autograd.grad(outs, inputs, grads, allow_unused=True)
                out[block] = _summary(forward, backward)
    return out


def rest_of_layer(layer: dict, blocks: dict) -> dict:
    """The layer's launches outside ``blocks`` (by op name: attention, the
    residual adds); a negative entry would mean a block counted alone launches
    more than it does inside the layer."""
    rest = {}
    for part in ("forward", "backward"):
        ops = collections.Counter(layer[f"{part}_ops"])
        for name in BLOCKS:
            ops.subtract(blocks[name][f"{part}_ops"])
        rest[part] = sum(ops.values())
        rest[f"{part}_ops"] = {op: n for op, n in sorted(ops.items()) if n}
    rest["total"] = rest["forward"] + rest["backward"]
    return rest


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
            for liger in (False, True):
                blocks = count_blocks(provider, width, device, args.tokens, args.r, liger)
                layer = count_layer(provider, width, device, args.tokens, args.r, liger)
                runs.append(dict(provider=provider, liger=liger, device=device, width=width, layer=layer,
                                 rest=rest_of_layer(layer, blocks), **blocks))
    print(f"{'provider':20s} {'liger':5s} {'device':6s} {'hidden':>6s} | {'q/k/v':>5s} {'mlp':>4s} {'o_proj':>6s} "
          f"{'norms+rope':>10s} {'rest':>4s} | {'layer fwd':>9s} {'bwd':>4s} {'total':>5s}")
    for run in runs:
        print(f"{run['provider']:20s} {str(run['liger']):5s} {run['device']:6s} {run['width']['hidden_size']:6d} | "
              f"{run['qkv']['total']:5d} {run['mlp']['total']:4d} {run['o_proj']['total']:6d} "
              f"{run['norms_rope']['total']:10d} {run['rest']['total']:4d} | {run['layer']['forward']:9d} "
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
        try:
            from importlib.metadata import version

            meta["liger_kernel"] = version("liger-kernel")
        except ImportError:
            pass
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "launches.json", {"meta": meta, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
