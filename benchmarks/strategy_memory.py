"""Each qlora_triton matmul strategy's extra peak bytes on a case.

A strategy's extra peak is what a call holds at its peak above what it leaves
behind (its outputs, gradients included, once the "dequant" scratch is
released): 0 for the fused GEMM and grad-input, the split-K partials for the
GEMV, one [N, K] weight in x's dtype for "dequant" (the scratch buffer, reused
across layers and calls until ``qt.release_scratch()``).

Measured with the same accounting as ``--preset NAME --memory-only``
(qlora_triton.tensor_memory): on CUDA the caching allocator
(``cuda_max_memory_allocated``, random weights); elsewhere the case built on
the meta device (``meta_tensor_accounting``), where the launchers run their
own code with the kernels skipped, so any shape costs no memory and no time.

    python -m benchmarks.strategy_memory [--shapes 4096x4096,...] [--m 1,16,4096]

prints the LLaMA shapes' table (meta on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import sys

import torch

import qlora_triton as qt
from qlora_triton import strategy as strategy_mod
from qlora_triton.tensor_memory import memory_meter
from qlora_triton.weight import NF4Weight

from .cases import LORA_ALPHA, LORA_R, M_SWEEP, SHAPES, Case

OPS = ("matmul_fwd", "matmul_grad_input", "lora_fwd_bwd")
DTYPE = torch.bfloat16


def applies(strategy: str, case: Case) -> bool:
    """Whether ``strategy`` runs code of its own for ``case`` (the GEMV takes
    M <= 16 and grad-input has none; forced beyond, it runs "fused")."""
    return strategy != "gemv" or (case.m <= strategy_mod.GEMV_MAX_M and case.op != "matmul_grad_input")


def _weight(shape: tuple[int, int], device: torch.device) -> NF4Weight:
    if device.type == "meta":
        return NF4Weight.empty(shape, DTYPE)
    return qt.quantize_nf4(torch.randn(shape, device=device, dtype=DTYPE) * 0.02)


def _call(case: Case, device: torch.device):
    """``(run, tensors alive before it)`` for ``case`` on ``device``."""
    n, k = case.shape
    qw = _weight(case.shape, device)
    if case.op == "lora_fwd_bwd":
        layer = qt.LoRALinear4bit(qw, r=LORA_R, lora_alpha=LORA_ALPHA).to(device)
        x = torch.randn(case.m, k, device=device, dtype=DTYPE, requires_grad=True)
        grad_y = torch.randn(case.m, n, device=device, dtype=DTYPE)
        params = [p for p in layer.parameters() if p.requires_grad]
        return (lambda: torch.autograd.grad(layer(x), [x, *params], grad_y)), [*layer.parameters(),
                                                                              *layer.buffers(), x, grad_y]
    a = torch.randn(case.m, n if case.op == "matmul_grad_input" else k, device=device, dtype=DTYPE)
    op = qt.nf4_matmul_grad_input if case.op == "matmul_grad_input" else qt.nf4_matmul
    return (lambda: op(a, qw)), [*qw.tensors().values(), a]


def extra_peak_bytes(case: Case, device: torch.device) -> tuple[str, dict[str, int | None]]:
    """``(kind, {strategy: extra peak bytes, or None where it does not apply})``;
    kind is "cuda_max_memory_allocated" or "meta_tensor_accounting"."""
    if case.op not in OPS:
        raise ValueError(f"case.op: expected one of {OPS}, got {case.op!r}")
    dev = torch.device("cuda" if torch.device(device).type == "cuda" else "meta")
    run, existing = _call(case, dev)
    out: dict[str, int | None] = {}
    kind = ""
    for name in strategy_mod.STRATEGIES:
        if not applies(name, case):
            out[name] = None
            continue
        if dev.type == "cuda":  # compile and autotune outside the measurement
            with qt.force_strategy(name):
                run()
        qt.release_scratch()
        meter = memory_meter(dev, existing)
        with qt.force_strategy(name), meter:
            result = run()
            qt.release_scratch()
            out[name] = meter.peak_bytes() - meter.live_bytes()
            del result
        kind = meter.kind
    return kind, out


def main(argv: list[str] | None = None) -> int:
    from .suite import _shape

    parser = argparse.ArgumentParser(prog="python -m benchmarks.strategy_memory",
                                     description="each matmul strategy's extra peak bytes on the LLaMA shapes")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--m", default="1,16,256,4096")
    parser.add_argument("--ops", default=",".join(OPS))
    args = parser.parse_args(argv)
    try:
        shapes = [_shape(s) for s in args.shapes.split(",") if s]
        ms = [int(m) for m in args.m.split(",") if m]
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))
    ops = [o for o in args.ops.split(",") if o]
    if any(o not in OPS for o in ops) or any(m < 1 for m in ms):
        parser.error(f"--ops: a subset of {','.join(OPS)}; --m: positive ints")
    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    print(f"extra peak bytes above the call's outputs, {DTYPE}, {device} "
          f"(M sweep of the suite: {','.join(map(str, M_SWEEP))})")
    print(f"{'op':18s} {'shape':>11s} {'M':>5s} " + " ".join(f"{s:>12s}" for s in strategy_mod.STRATEGIES))
    for op in ops:
        for shape in shapes:
            for m in ms:
                kind, extra = extra_peak_bytes(Case(op, shape, m), device)
                cells = " ".join(f"{'-' if v is None else f'{v / 2**20:.1f} MiB':>12s}" for v in extra.values())
                print(f"{op:18s} {shape[0]:>5d}x{shape[1]:<5d} {m:>5d} {cells}")
    print(f"({kind}; '-': the strategy runs fused's code there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
