"""The fused NF4 matmul's benchmark: the suite (``python -m benchmarks``)
restricted to the matmul ops, with a table of one line per case and provider.

Same cases, providers, timing, rel_err check and JSON as the suite (see
benchmarks/README.md): ``qt.nf4_matmul`` against bitsandbytes' ``matmul_4bit``,
torchao's ``linear_nf4`` and dense bf16 ``F.linear``, M in {1 .. 4096} x the
LLaMA layer shapes; each line gives the median time, TFLOP/s, GB/s, rel_err,
time over the floor and the speedup over every other provider.

    python benchmarks/bench_matmul.py                 # full sweep (CUDA) -> benchmarks/results/<gpu>-<date>-matmul/
    python benchmarks/bench_matmul.py --smoke         # every case once, tiny, on the CPU
    python benchmarks/bench_matmul.py --m 1,16,4096 --shapes 4096x4096 --ops matmul_fwd,matmul_grad_input
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: import the suite from the repository root
    sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

from benchmarks.suite import main as suite_main  # noqa: E402

OPS = ("matmul_fwd", "matmul_grad_input")


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="benchmarks/bench_matmul.py", ops=OPS, default_ops=("matmul_fwd",),
                      tag="matmul", per_provider=True)


if __name__ == "__main__":
    sys.exit(main())
