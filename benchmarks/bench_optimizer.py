"""The paged optimizers' benchmark: the suite (``python -m benchmarks``)
restricted to the optimizer step, with a table of one line per case and provider.

Same cases, providers, timing and JSON as the suite (see benchmarks/README.md):
one AdamW step over 1e9 fp32 parameters in 16 tensors, 32-bit and 8-bit state;
``qt.PagedAdamW`` / ``qt.PagedAdamW8bit`` against bitsandbytes'
``PagedAdamW32bit`` / ``PagedAdamW8bit`` and ``torch.optim.AdamW(fused=True)``.
The floor is memory: 28 bytes per parameter for 32-bit state, about 16 for
8-bit; on CUDA the peak and resident memory columns show where the state lives.

    python benchmarks/bench_optimizer.py              # CUDA -> benchmarks/results/<gpu>-<date>-optimizer/
    python benchmarks/bench_optimizer.py --smoke      # every case once, tiny, on the CPU
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # run as a script: import the suite from the repository root
    sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

from benchmarks.suite import main as suite_main  # noqa: E402

OPS = ("optimizer_step",)


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="benchmarks/bench_optimizer.py", ops=OPS, tag="optimizer", per_provider=True)


if __name__ == "__main__":
    sys.exit(main())
