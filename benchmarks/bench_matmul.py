"""Benchmark ``qt.nf4_matmul`` (y = x @ W.T through a packed NF4 weight) against
dense bf16 ``F.linear`` (cuBLAS) and bitsandbytes' ``matmul_4bit``.

Cases: M (rows of x) in {1 .. 4096} x LLaMA layer shapes (out x in). Each row
reports the median time (``triton.testing.do_bench`` on CUDA), TFLOP/s
(2 M N K / t), GB/s of the provider's own weight bytes (packed NF4 + scales for
the 4-bit providers, dense bf16 for F.linear; the decode floor is these bytes
over bandwidth), and ``vs_<other>`` = other's time / this time (> 1: faster).
The weights rotate through enough copies to exceed twice the L2 cache, so a
small layer is not timed out of L2; ``rel_err`` checks each 4-bit provider
against x @ dequantize(W).T so a miscompiled kernel cannot look fast.

    python benchmarks/bench_matmul.py                  # full sweep (CUDA)
    python benchmarks/bench_matmul.py --smoke          # every case once, tiny, CPU
    python benchmarks/bench_matmul.py --m 1 16 4096 --shapes 4096x4096 --json out.json

Importable: :func:`cases`, :func:`providers`, :func:`run` (a list of dict rows)
for the benchmark runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

import qlora_triton as qt

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)
# LLaMA layer shapes, (out_features N, in_features K).
SHAPES = {
    "4096x4096": (4096, 4096),      # LLaMA-7B attention projections
    "11008x4096": (11008, 4096),    # LLaMA-7B MLP up/gate
    "4096x11008": (4096, 11008),    # LLaMA-7B MLP down
    "8192x8192": (8192, 8192),      # LLaMA-70B attention
    "28672x8192": (28672, 8192),    # LLaMA-70B MLP up/gate
}
BLOCKSIZE = 64
L2_BYTES = 60 * 2**20               # H100/H200 L2 is 50-60 MB
SMOKE_DIVISOR = 64                  # --smoke: N, K / 64 and M <= 128


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str          # the LLaMA shape's name (also for smoke cases)
    M: int
    N: int
    K: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def flops(self) -> int:
        return 2 * self.M * self.N * self.K


def cases(smoke: bool = False, shapes=None, ms=None, dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """Every (shape, M) case; ``smoke`` shrinks each to a tiny one of the same kind."""
    out = []
    for name in shapes or SHAPES:
        N, K = SHAPES[name]
        for M in ms or M_VALUES:
            if smoke:
                M, N_, K_ = min(M, 128), math.ceil(N / SMOKE_DIVISOR), math.ceil(K / SMOKE_DIVISOR)
                out.append(Case(name, M, N_, K_, dtype))
            else:
                out.append(Case(name, M, N, K, dtype))
    return out


# A provider: (case, dense weight W [N, K], device) -> (fn(x) -> y, weight_bytes,
# reference W as the provider sees it (dequantized) or None).
Provider = Callable[[Case, torch.Tensor, torch.device], tuple]


def _copies(nbytes: int, device: torch.device) -> int:
    """Weight copies to rotate through so that they overflow L2 twice."""
    return 1 if device.type != "cuda" else max(1, min(64, math.ceil(2 * L2_BYTES / nbytes)))


def _rotating(items: list, call: Callable) -> Callable:
    state = {"i": 0}

    def fn(x):
        state["i"] = (state["i"] + 1) % len(items)
        return call(x, items[state["i"]])
    return fn


def _qlora_triton(case, w, device):
    qw = qt.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True)
    copies = [qw] + [dataclasses.replace(qw, **{n: t.clone() for n, t in qw.tensors().items()})
                     for _ in range(_copies(qw.nbytes, device) - 1)]
    return _rotating(copies, lambda x, q: qt.nf4_matmul(x, q)), qw.nbytes, qt.dequantize_nf4(qw, torch.float32)


def _torch_bf16(case, w, device):
    dense = w.to(case.dtype)
    nbytes = dense.numel() * dense.element_size()
    copies = [dense] + [dense.clone() for _ in range(_copies(nbytes, device) - 1)]
    return _rotating(copies, lambda x, d: F.linear(x, d)), nbytes, None


def _bitsandbytes(case, w, device):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    nbytes = qt.NF4Weight.from_bnb(packed, state).nbytes
    copies = [packed] + [packed.clone() for _ in range(_copies(nbytes, device) - 1)]
    deq = bnbF.dequantize_4bit(packed, state).float()
    return _rotating(copies, lambda x, p: bnb.matmul_4bit(x, p.t(), quant_state=state)), nbytes, deq


def providers() -> dict[str, Provider]:
    """The providers available in this environment (bitsandbytes when importable)."""
    out: dict[str, Provider] = {"qlora_triton": _qlora_triton, "torch_bf16": _torch_bf16}
    try:
        import bitsandbytes  # noqa: F401
        out["bitsandbytes"] = _bitsandbytes
    except Exception:  # not installed, or no library for this platform
        pass
    return out


def _time_ms(fn: Callable, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()  # smoke mode: one call, only to exercise the code
    fn(x)
    return (time.perf_counter() - start) * 1e3


def run(case_list: list[Case], device: torch.device | str | None = None,
        provider_names: list[str] | None = None) -> list[dict]:
    """Time every provider on every case; returns one dict row per (case, provider)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = providers()
    names = provider_names or list(available)
    rows = []
    for case in case_list:
        # Fresh random (never zero) inputs per case, at a typical weight scale.
        w = (torch.randn(case.N, case.K, device=device) * 0.02).to(case.dtype)
        x = torch.randn(case.M, case.K, device=device).to(case.dtype)
        case_rows = []
        for name in names:
            fn, nbytes, w_seen = available[name](case, w, device)
            y = fn(x)
            err = None
            if w_seen is not None:
                ref = x.float() @ w_seen.t()
                err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
            t = _time_ms(fn, x, device)
            case_rows.append(dict(
                provider=name, shape=case.shape, M=case.M, N=case.N, K=case.K,
                dtype=str(case.dtype).removeprefix("torch."), device=device.type,
                time_ms=t, tflops=case.flops / (t * 1e-3) / 1e12, weight_bytes=nbytes,
                weight_gbps=nbytes / (t * 1e-3) / 1e9, rel_err=err,
            ))
            del fn
        for row in case_rows:
            for other in case_rows:
                if other is not row:
                    row[f"vs_{other['provider']}"] = other["time_ms"] / row["time_ms"]
        rows.extend(case_rows)
    return rows


def format_table(rows: list[dict]) -> str:
    names = sorted({r["provider"] for r in rows})
    head = f"{'shape':>11} {'M':>5} {'provider':>13} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'rel_err':>8}"
    head += "".join(f" {'vs_' + n:>16}" for n in names)
    lines = [head]
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        line = (f"{r['shape']:>11} {r['M']:>5} {r['provider']:>13} {r['time_ms']:>9.4f} "
                f"{r['tflops']:>8.2f} {r['weight_gbps']:>8.1f} {err:>8}")
        line += "".join(f" {r['vs_' + n]:>16.2f}" if "vs_" + n in r else f" {'-':>16}" for n in names)
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every case once at tiny size on the CPU (checks the script runs)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="subset of the layer shapes")
    parser.add_argument("--m", nargs="+", type=int, help="subset of M values")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--providers", nargs="+", help="subset of the providers")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else None
    rows: list[dict] = []
    # Case by case, rewriting the JSON each time: a run cut short keeps what it measured.
    for case in cases(args.smoke, args.shapes, args.m, getattr(torch, args.dtype)):
        rows += run([case], device, args.providers)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
