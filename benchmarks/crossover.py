"""Calibrate the strategy crossover (``qlora_triton.strategy.CROSSOVER``) on this GPU.

For each shape bucket ("large": layers of at least 4096x4096; "small": below)
and compute dtype, time one training product, forward plus grad-input
(``x @ W.T`` and ``grad_y @ W``), under ``force_strategy("fused")`` and
``force_strategy("dequant")`` at growing M. The crossover of a bucket is the
smallest M of the sweep from which "dequant" is at least as fast as "fused"
on every shape of the bucket at that M and at every larger M (None: never).
Writes the measured table as JSON, every timing included, after every row
(``"complete": false`` until the sweep ends, so a run cut short by a time
limit still leaves what it measured)::

    python -m benchmarks.crossover --out crossover.json     # on the GPU (the GPU check runs it)
    python -m benchmarks.crossover --smoke --out x.json     # toy sizes: checks the mechanics

and ``qlora_triton.strategy.load_crossover(path)`` (or the environment variable
``QLORA_TRITON_CROSSOVER=path``) makes the running process use it. A table
measured on the CPU is refused there: interpreted kernels say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import qlora_triton as qt
from qlora_triton import strategy as strategy_mod
from qlora_triton.finetune.report import write_json

from .timing import Timer

SHAPES = {"large": ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)),
          "small": ((1024, 4096), (4096, 1024))}
M_SWEEP = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DTYPES = (torch.bfloat16, torch.float16)
SMOKE_SHAPES = {"small": ((64, 128), (32, 64))}  # toy layers are all "small"
SMOKE_M = (17, 40)


def _product(qw, M: int, dtype: torch.dtype, device: torch.device):
    """A zero-argument call: the forward and grad-input products of one layer."""
    N, K = qw.shape
    x = torch.randn(M, K, device=device, dtype=dtype)
    grad_y = torch.randn(M, N, device=device, dtype=dtype)

    def run():
        qt.nf4_matmul(x, qw)
        qt.nf4_matmul_grad_input(grad_y, qw)

    return run


def measure(shapes: dict, ms: tuple, dtypes: tuple, device: torch.device, timer: Timer,
            on_row=None) -> list[dict]:
    """One row per (bucket, shape, dtype, M): ms under "fused" and "dequant";
    ``on_row(rows so far)`` after each row (the file is written as it goes)."""
    rows = []
    for bucket, bucket_shapes in shapes.items():
        for N, K in bucket_shapes:
            if strategy_mod.shape_bucket(N, K) != bucket:
                raise ValueError(f"shape {N}x{K} is not in the {bucket!r} bucket")
            qw = qt.quantize_nf4(torch.randn(N, K, device=device) * 0.02, double_quant=True)
            for dtype in dtypes:
                for M in ms:
                    fn = _product(qw, M, dtype, device)
                    row = {"bucket": bucket, "N": N, "K": K, "M": M, "dtype": str(dtype).removeprefix("torch.")}
                    for name in ("fused", "dequant"):
                        with strategy_mod.force_strategy(name):
                            row[f"{name}_ms"] = timer(fn)
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
            del qw
    qt.release_scratch()
    return rows


def crossover(rows: list[dict]) -> dict[tuple[str, str], int | None]:
    """``{(bucket, dtype): smallest M from which "dequant" wins on every shape, or None}``."""
    out: dict[tuple[str, str], int | None] = {}
    for key in sorted({(r["bucket"], r["dtype"]) for r in rows}):
        ms = sorted({r["M"] for r in rows if (r["bucket"], r["dtype"]) == key})
        wins = {m: all(r["dequant_ms"] <= r["fused_ms"] for r in rows
                       if (r["bucket"], r["dtype"], r["M"]) == (*key, m)) for m in ms}
        start = None
        for m in reversed(ms):  # the longest run of wins that reaches the largest M
            if not wins[m]:
                break
            start = m
        out[key] = start
    return out


def table(rows: list[dict], device: torch.device, complete: bool = True) -> dict:
    """The JSON document; ``complete`` False while the sweep is still running (a
    crossover read from a cut-short sweep only covers the M values measured)."""
    kind = strategy_mod.gpu_kind(device)
    return {
        "gpu_kind": kind, "complete": complete,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "crossover": [{"bucket": b, "dtype": d, "dequant_from_m": m}
                      for (b, d), m in crossover(rows).items()],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write (atomically)")
    parser.add_argument("--smoke", action="store_true", help="toy shapes and two M: checks the mechanics")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes, ms = (SMOKE_SHAPES, SMOKE_M) if args.smoke else (SHAPES, M_SWEEP)
    timer = Timer(device, cpu_reps=1) if device.type == "cpu" else Timer(device)
    out = Path(args.out)
    # Written after every row (atomically), so a time limit leaves the rows measured so far.
    rows = measure(shapes, ms, DTYPES, device, timer, on_row=lambda rows: write_json(out, table(rows, device, False)))
    result = table(rows, device)
    write_json(out, result)
    for row in result["crossover"]:
        start = row["dequant_from_m"]
        print(f"{result['gpu_kind']} {row['bucket']:5s} {row['dtype']:8s}: dequant from M = {start}"
              if start is not None else
              f"{result['gpu_kind']} {row['bucket']:5s} {row['dtype']:8s}: never dequant (fused wins at some M <= {max(ms)})")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
