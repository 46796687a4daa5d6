"""Optimizer step time: qlora_triton's PagedAdamW / PagedAdamW8bit against
torch.optim.AdamW(fused=True) and, when importable, bitsandbytes'
PagedAdamW32bit / PagedAdamW8bit.

Importable: ``run(sizes, smoke=False) -> list[dict]`` (one row per optimizer x
size, machine-readable; a suite runner collects them). CLI:

    python benchmarks/bench_optimizer.py                 # CUDA, do_bench, table + JSON
    python benchmarks/bench_optimizer.py --json out.json
    python benchmarks/bench_optimizer.py --smoke         # every case once, tiny, on the CPU

Floor: an fp32 AdamW step reads param, grad, exp_avg, exp_avg_sq and writes
param, exp_avg, exp_avg_sq: 28 bytes per parameter (8-bit states: 4+4+1+1 read,
4+1+1 written + absmax, ~16 bytes), so at ~4.3 TB/s 100M parameters take at
least ~0.65 ms (8-bit ~0.37 ms). Rows report the achieved bandwidth against
those byte counts. Parameters are re-stepped with fresh gradients; at the
default sizes the working set exceeds L2, so no input rotation is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

try:
    import qlora_triton as qt
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import qlora_triton as qt

# Bytes moved per parameter by one step (reads + writes), for the bandwidth column.
BYTES_PER_PARAM = {"fp32-states": 28, "8bit-states": 16}
DEFAULT_SIZES = [(4096, 4096), (8192, 8192), (10, 4096 * 4096)]


def _optimizers(device: torch.device, smoke: bool) -> dict[str, tuple[Callable, str]]:
    """name -> (factory(params), state kind)."""
    cases: dict[str, tuple[Callable, str]] = {
        "torch.AdamW(fused)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=device.type == "cuda"),
                               "fp32-states"),
        "qt.PagedAdamW": (lambda ps: qt.PagedAdamW(ps, lr=1e-3, paged=device.type == "cuda"), "fp32-states"),
        "qt.PagedAdamW(paged=False)": (lambda ps: qt.PagedAdamW(ps, lr=1e-3, paged=False), "fp32-states"),
        "qt.PagedAdamW8bit": (lambda ps: qt.PagedAdamW8bit(ps, lr=1e-3, paged=device.type == "cuda"),
                              "8bit-states"),
    }
    if device.type == "cuda" and not smoke:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            cases["bnb.PagedAdamW32bit"] = (lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-3), "fp32-states")
            cases["bnb.PagedAdamW8bit"] = (lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3), "8bit-states")
    return cases


def bench_case(name: str, factory: Callable, kind: str, shape: tuple[int, int], device: torch.device,
               smoke: bool) -> dict:
    torch.manual_seed(0)
    p = torch.randn(shape, device=device, requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = factory([p])
    opt.step()  # allocate states, compile
    if smoke:
        t0 = time.perf_counter()
        opt.step()
        ms = (time.perf_counter() - t0) * 1e3
    else:
        import triton.testing
        ms = triton.testing.do_bench(opt.step, warmup=25, rep=200, return_mode="median")
    n = p.numel()
    gbps = BYTES_PER_PARAM[kind] * n / (ms * 1e-3) / 1e9
    row = dict(op="adamw_step", optimizer=name, shape=list(shape), params=n, dtype="float32",
               device=str(device), ms=ms, gb_per_s=gbps, smoke=smoke)
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(opt, "device_resident_bytes"):
        row["state_bytes_on_device"] = opt.device_resident_bytes()
    del opt, p
    return row


def run(sizes: list[tuple[int, int]] | None = None, smoke: bool = False) -> list[dict]:
    """One row per optimizer x parameter shape. ``smoke``: CPU, tiny, one step each."""
    if smoke:
        device, sizes = torch.device("cpu"), [(64, 257)]
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("the optimizer benchmark needs CUDA; use --smoke on the CPU")
        device, sizes = torch.device("cuda"), sizes or DEFAULT_SIZES
    rows = []
    for shape in sizes:
        for name, (factory, kind) in _optimizers(device, smoke).items():
            rows.append(bench_case(name, factory, kind, shape, device, smoke))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'optimizer':<28} {'shape':>16} {'ms':>9} {'GB/s':>8}"]
    for r in rows:
        lines.append(f"{r['optimizer']:<28} {'x'.join(map(str, r['shape'])):>16} {r['ms']:>9.3f} {r['gb_per_s']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every case once, tiny, on the CPU")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(smoke=args.smoke)
    meta = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if torch.cuda.is_available() and not args.smoke:
        import triton
        meta.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(format_table(rows))


if __name__ == "__main__":
    main()
