"""The ``qlora-triton`` console script: one subcommand per tool.

    qlora-triton bench [--smoke] [--out DIR] ...   the benchmark suite (benchmarks/)

Each subcommand registers in ``SUBCOMMANDS``: a help line, a function that adds
its arguments and one that runs them. ``bench`` hands every option after it to
the suite's own parser (``python -m benchmarks --help`` lists them). The suite
is a folder of the repository, not of the installed package, so ``bench`` runs
from a checkout: an editable install, or the repository root as the current
directory.
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


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    pass  # the suite parses its own options: they arrive as ``args.rest``


def run_bench(args: argparse.Namespace) -> int:
    root = _find_benchmarks()
    if root is None:
        raise SystemExit("qlora-triton bench runs the suite in benchmarks/ of a repository checkout: "
                         "install with `pip install -e .` or run it from the repository root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.suite import main as bench_main

    return bench_main(args.rest)


# name -> (help, add_arguments, run, passes unknown options through)
SUBCOMMANDS = {
    "bench": ("run the benchmark suite: every op and the LoRA layer against bitsandbytes, torchao and bf16 "
              "(options: `qlora-triton bench --help`)", add_bench_arguments, run_bench, True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-triton", description="qlora_triton tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _, passthrough) in SUBCOMMANDS.items():
        # a pass-through subcommand leaves -h/--help to the tool it hands over to
        add_arguments(sub.add_parser(name, help=help_text, description=help_text, add_help=not passthrough))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and not SUBCOMMANDS[args.command][3]:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
