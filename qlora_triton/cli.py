"""The ``qlora-triton`` console script: one entry point, one subcommand per task.

    qlora-triton bench [--smoke] [--out DIR] ...   the benchmark suite (benchmarks/)

The benchmark suite is a folder of the repository, not part of the installed
package, so ``bench`` runs from a checkout (an editable install, or the current
directory being the repository root).
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def _find_benchmarks() -> pathlib.Path | None:
    """The repository root that holds benchmarks/: beside this package (an
    editable install or a checkout on sys.path), else the current directory."""
    for root in (pathlib.Path(__file__).resolve().parent.parent, pathlib.Path.cwd()):
        if (root / "benchmarks" / "suite.py").is_file():
            return root
    return None


def bench(argv: list[str]) -> int:
    root = _find_benchmarks()
    if root is None:
        raise SystemExit("qlora-triton bench runs the suite in benchmarks/ of a repository checkout: "
                         "install with `pip install -e .` or run it from the repository root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.suite import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="qlora-triton", description="QLoRA with Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    # bench's options belong to the suite's own parser: pass them through untouched.
    sub.add_parser("bench", help="run the benchmark suite (see `qlora-triton bench --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
