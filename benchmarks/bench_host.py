"""Host (CPU-side Python) time per call of the decode path, and its kernel count.

At M=1 a 4096x4096 NF4 layer's kernel needs about 2 us of HBM time, so what the
host spends per call can decide decode speed. This script times, in one run and
side by side, ``qt.nf4_matmul`` against ``F.linear``, ``Linear4bit`` against
``nn.Linear`` and ``LoRALinear4bit`` (default fp32 master adapters) against a
dense ``nn.Linear`` + LoRA module (same shapes, adapters in the compute dtype:
the lean dense case), all at M=1 in eval mode under ``torch.no_grad()``, and
counts each call's kernel-launching ops (defined in :mod:`benchmarks.launches`).

    python benchmarks/bench_host.py                  # CPU, Triton launches stubbed (no GPU needed)
    python benchmarks/bench_host.py --device cuda    # real launches, 4096x4096 bf16
    python benchmarks/bench_host.py --smoke          # a few calls (CI)

How host time is separated from kernel time:

* ``--device cpu`` (default): CPU tensors of a small layer (64x64, fp32) so
  that every ATen kernel does negligible work (host cost does not depend on the
  shape; the op counts below are also given for 4096x4096 bf16). Our ops take
  the compiled-Triton path (TRITON_INTERPRET is unset for this process: the
  ``torch.library`` op, the launcher, its allocations and casts, the
  autotuner's cache lookup) and only the final ``JITFunction.run`` (Triton's
  own argument binding, kernel cache lookup and driver call) is a stub that
  evaluates the grid. So our rows leave out Triton's per-launch dispatch and
  every row leaves out CUDA's per-launch cost; the ``launches`` column says
  how many of those each call would pay. The autotuner's first call gets stub
  timings (there is no GPU to time configs on); from then on its cache hit is
  the real code. oneDNN is off so that tiny fp32 products take the plain path.
* ``--device cuda``: real tensors and launches; the wall time of a batch of
  calls between two synchronizations (the kernels are far shorter than the
  host time, so the GPU never holds the host back).

Times are medians over rounds of (batch time / calls per batch), the two sides
of a row measured alternately.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Iterator

if __package__ in (None, ""):  # run as a script: import benchmarks/ from the repository root
    sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)
if "cuda" not in sys.argv:
    # Before triton is imported: the CPU run times the compiled-Triton launch path.
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import qlora_triton as qt  # noqa: E402
from qlora_triton import library  # noqa: E402
from benchmarks.launches import count_launches, stub_triton_kernels  # noqa: E402


class DenseLoRA(nn.Module):
    """``base(x) + s * B(A(dropout(x)))``: a dense layer with a LoRA adapter, as
    PEFT's ``lora.Linear`` computes it (adapters in the compute dtype)."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, dropout: float) -> None:
        super().__init__()
        self.base, self.scaling = base, lora_alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


@contextlib.contextmanager
def _stubbed_triton_path() -> Iterator[None]:
    """CPU tensors take the Triton branch of our ops, with the final launch
    stubbed and the autotuner's config timing answered without a GPU."""
    real_use_triton, real_bench = library.use_triton, Autotuner._bench
    mkldnn = torch.backends.mkldnn.enabled
    library.use_triton = lambda device: True
    Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]
    torch.backends.mkldnn.enabled = False
    try:
        with stub_triton_kernels():
            yield
    finally:
        library.use_triton, Autotuner._bench = real_use_triton, real_bench
        torch.backends.mkldnn.enabled = mkldnn


def build(n: int, k: int, r: int, dtype: torch.dtype, device: str) -> list[tuple[str, Callable, Callable]]:
    """(name, ours, dense) pairs of calls on the same shapes and input."""
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=False, dtype=dtype, device=device)
    lin4 = qt.Linear4bit.from_linear(dense).eval()
    lora = qt.LoRALinear4bit.from_linear(dense, r=r, lora_alpha=2 * r, lora_dropout=0.05).eval()
    dense_lora = DenseLoRA(dense, r, 2 * r, 0.05).eval()
    with torch.no_grad():
        for m in (lora, dense_lora):
            m.lora_B.weight.normal_()
    x = torch.randn(1, k, dtype=dtype, device=device)
    qw, w = lin4.quant_weight, dense.weight
    return [
        ("nf4_matmul vs F.linear", lambda: qt.nf4_matmul(x, qw), lambda: F.linear(x, w)),
        ("Linear4bit vs nn.Linear", lambda: lin4(x), lambda: dense(x)),
        ("LoRALinear4bit vs nn.Linear+LoRA", lambda: lora(x), lambda: dense_lora(x)),
    ]


def host_us(fn: Callable, device: str, rounds: int, calls: int) -> list[float]:
    """Host time of one call in microseconds, one value per round."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    per_call = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter_ns() - start) / calls / 1e3)
    sync()
    return per_call


def launches(fn: Callable) -> tuple[int, dict]:
    fn()  # warm: the first call may autotune or fill caches
    with count_launches(run_kernels=True) as counts:
        fn()
    return sum(counts.values()), dict(sorted(counts.items()))


def run(n: int, k: int, r: int, dtype: torch.dtype, device: str, rounds: int, calls: int) -> list[dict]:
    rows = []
    for name, ours, dense in build(n, k, r, dtype, device):
        for fn in (ours, dense):  # warm-up
            for _ in range(max(10, calls)):
                fn()
        times: dict[str, list[float]] = {"ours": [], "dense": []}
        for _ in range(rounds):  # alternate, so drift of a shared machine hits both alike
            times["ours"] += host_us(ours, device, 1, calls)
            times["dense"] += host_us(dense, device, 1, calls)
        t_ours, t_dense = statistics.median(times["ours"]), statistics.median(times["dense"])
        n_ours, what_ours = launches(ours)
        n_dense, what_dense = launches(dense)
        rows.append(dict(case=name, host_us=t_ours, dense_host_us=t_dense, ratio=t_ours / t_dense,
                         min_us=min(times["ours"]), dense_min_us=min(times["dense"]),
                         launches=n_ours, dense_launches=n_dense, ops=what_ours, dense_ops=what_dense))
    return rows


def launcher_us(n: int, k: int, dtype: torch.dtype, device: str, rounds: int, calls: int) -> dict:
    """Host time of the Triton launcher alone (``qlora_triton.ops.matmul.nf4_matmul``
    on a checked weight), the part of every row above that the kernels own."""
    from qlora_triton.ops.matmul import nf4_matmul as launch

    qw = qt.quantize_nf4(torch.randn(n, k, dtype=dtype, device=device))
    x = torch.randn(1, k, dtype=dtype, device=device)
    for _ in range(max(10, calls)):
        launch(x, qw, None)
    times = host_us(lambda: launch(x, qw, None), device, rounds, calls)
    return {"median_us": statistics.median(times), "min_us": min(times)}


def counts_at(n: int, k: int, r: int, dtype: torch.dtype, device: str) -> list[dict]:
    """Launch counts only (one call each), e.g. at the full shape and dtype on the CPU."""
    rows = []
    for name, ours, dense in build(n, k, r, dtype, device):
        (n_ours, what_ours), (n_dense, what_dense) = launches(ours), launches(dense)
        rows.append(dict(case=name, launches=n_ours, dense_launches=n_dense, ops=what_ours,
                         dense_ops=what_dense))
    return rows


def table(rows: list[dict]) -> str:
    timed = "host_us" in rows[0]
    head = f"{'case':34} " + (f"{'ours us':>8} {'dense us':>8} {'ratio':>6} {'min':>6} {'d.min':>6} "
                              if timed else "") + f"{'launches':>8} {'dense':>5}"
    lines = [head, "-" * len(head)]
    for row in rows:
        times = (f"{row['host_us']:8.1f} {row['dense_host_us']:8.1f} {row['ratio']:6.2f} "
                 f"{row['min_us']:6.1f} {row['dense_min_us']:6.1f} ") if timed else ""
        lines.append(f"{row['case']:34} {times}{row['launches']:8d} {row['dense_launches']:5d}")
    for row in rows:
        lines.append(f"  {row['case']}: ours {row['ops']}; dense {row['dense_ops']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_host.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", help="N x K of the timed layer (out x in); default 64x64 on the CPU, "
                                   "4096x4096 on CUDA")
    p.add_argument("--count-shape", default="4096x4096", help="N x K of the launch-count-only table")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--calls", type=int, default=5, help="calls per timed round")
    p.add_argument("--smoke", action="store_true", help="a few rounds of a few calls (CI)")
    p.add_argument("--json", type=pathlib.Path, help="also write the rows and the setup here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU")
    cpu = args.device == "cpu"
    shape = args.shape or ("64x64" if cpu else "4096x4096")
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    if args.smoke:
        args.rounds, args.calls, args.count_shape = 3, 5, "256x128"
    n, k = (int(v) for v in shape.lower().split("x"))
    cn, ck = (int(v) for v in args.count_shape.lower().split("x"))
    with torch.no_grad(), (_stubbed_triton_path() if cpu else contextlib.nullcontext()):
        rows = run(n, k, args.r, dtype, args.device, args.rounds, args.calls)
        launcher = launcher_us(n, k, dtype, args.device, args.rounds, args.calls)
        counts = {str(d).removeprefix("torch."): counts_at(cn, ck, args.r, d, args.device)
                  for d in (torch.bfloat16, torch.float32)}
    setup = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 device=args.device, gpu=None if cpu else torch.cuda.get_device_name(),
                 machine=f"{platform.machine()}, {os.cpu_count()} CPUs", python=platform.python_version(),
                 torch=torch.__version__, triton=triton.__version__, qlora_triton=qt.__version__,
                 shape=shape, r=args.r, dtype=str(dtype).removeprefix("torch."), M=1,
                 rounds=args.rounds, calls=args.calls,
                 command=" ".join(["benchmarks/bench_host.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"host time per call, M=1, {shape}, r={args.r}, {setup['dtype']}, device={args.device}"
          f"{' (Triton launches stubbed)' if cpu else ''}: median of {args.rounds} rounds x {args.calls} calls")
    print(table(rows))
    print(f"  (the Triton launcher, ops.matmul.nf4_matmul, inside each of our rows: median "
          f"{launcher['median_us']:.1f} us, min {launcher['min_us']:.1f} us; ratio = median ours / median "
          "dense; min, d.min = fastest round, the better estimate on a shared machine)")
    for name, rows_d in counts.items():
        print(f"\nkernel-launching ops per call at {args.count_shape}, {name} x "
              f"(LoRALinear4bit adapters in float32):")
        print(table(rows_d))
    lora = rows[-1]
    lora_bf16 = counts["bfloat16"][-1]
    print(f"\nLoRALinear4bit / dense LoRA host time: {lora['ratio']:.2f}x by medians, "
          f"{lora['min_us'] / lora['dense_min_us']:.2f}x by fastest rounds (target <= 2); "
          f"launches per call {lora_bf16['launches']} at bf16 (target <= 4)")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(dict(setup=setup, rows=rows, launcher_us=launcher, counts=counts), indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
