"""The ``qlora-triton`` console script: one subcommand per tool.

Each subcommand registers the same way: a function that adds its arguments and
one that runs them. ``bench`` hands every option after it to the benchmark
suite's own parser (``qlora-triton bench --help`` lists them); the suite is a
folder of the repository (benchmarks/), not of the installed package, so it
runs from a checkout: an editable install, or the repository root as the
current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder (default: pre-train the bundled small LLaMA)")
    p.add_argument("--data", help="local .txt, or .jsonl with a 'text' field (default: the bundled task 2)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per method (default: by device)")
    p.add_argument("--pretrain-steps", type=int, help="fp32 pre-training steps of the bundled model")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: by device)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: by device)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default 5e-3; 2e-4 with --preset)")
    p.add_argument("--output-dir", help="where summary.json and loss.png go (default runs/finetune-<time>)")
    p.add_argument("--save-adapter", nargs="?", const="", default=None, metavar="DIR",
                   help="save the QLoRA adapter in PEFT format (default DIR: <output-dir>/adapter)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "triton", "torch"),
                   help="NF4 ops: auto (default) = Triton on CUDA, the torch reference on the CPU")
    p.add_argument("--bf16-matmul", choices=("auto", "native", "fp32"),
                   help="how both fine-tuning phases run bf16 matmuls and attention: auto (default) = fp32 "
                        "on a CPU without native bf16 (bf16 operands, fp32 accumulation, bf16 result), "
                        "native elsewhere; native = torch's bf16 kernels")
    p.add_argument("--preset", choices=("tiny", "7b", "13b", "33b", "65b", "70b"),
                   help="instead: build a LLaMA-shaped NF4 model of this size (LLaMA-1; 70b: LLaMA-2) "
                        "and time a few LoRA steps")
    p.add_argument("--memory-only", action="store_true",
                   help="with --preset: no training run; print the peak memory of one LoRA step "
                        "(forward, backward, optimizer) under each NF4 matmul strategy (gemv, fused, "
                        "dequant). With CUDA: a random-weight model, torch.cuda.max_memory_allocated; "
                        "without (or --device meta): the model on the meta device, by tensor "
                        "accounting (no GPU, seconds). Default tokens: --batch-size 1 --seq-len 512")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA: the fused decoder blocks (qt.fuse; default on where the model allows it)")
    p.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA: Liger-Kernel RMSNorm, RoPE and fused linear cross-entropy on CUDA, the "
                        "chunked cross-entropy elsewhere (default on)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA: offloaded checkpoints, each layer's input waits in pinned host memory "
                        "for the backward, and the PagedAdamW states are evicted after each step (default off)")
    p.add_argument("--estimate-step", action="store_true",
                   help="with --preset: print the ESTIMATED step time (roofline sum over the ops on meta: "
                        "790 TFLOP/s, 4.3 TB/s, 4 us per launch) of QLoRA beside 16-bit LoRA, then exit")
    p.add_argument("--lora16", action="store_true",
                   help="with --preset: then time the 16-bit LoRA baseline on the same shape (PEFT on dense "
                        "bf16 weights, the same r, alpha, checkpointing, Liger option, tokens and steps, torch "
                        "AdamW) and print QLoRA's step time and peak memory over it")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.add_argument("--estimate", action="store_true",
                   help="with --preset: print the memory one rank needs with 1, 2, 4 and 8 FSDP2 ranks and "
                        "the fewest ranks of --rank-memory that fit, then exit (builds nothing)")
    p.add_argument("--rank-memory", type=float, metavar="GIB",
                   help="with --estimate: memory per rank in GiB (default: this device's total)")


# Options of the fine-tune that a --preset run has no use for (it builds a random-weight
# model of the preset's shape, on the default backend of its device).
PRESET_UNUSED = ("model", "data", "dropout", "pretrain_steps", "save_adapter", "backend", "bf16_matmul")
# Options that only --preset takes.
PRESET_ONLY = ("estimate", "rank_memory", "memory_only", "estimate_step", "lora16")


def _print_estimate(args: argparse.Namespace) -> None:
    from .finetune import presets

    shape = presets.LLAMA_SHAPES[args.preset]
    batch_size, seq_len = args.batch_size or 1, args.seq_len or 512
    if args.rank_memory is not None:
        if args.rank_memory <= 0:
            raise ValueError(f"--rank-memory: expected a positive number of GiB, got {args.rank_memory}")
        rank_bytes = int(args.rank_memory * 2**30)
    else:
        import torch
        from .finetune.memory import total_bytes

        rank_bytes = total_bytes(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    print(f"preset {args.preset}: {presets.linear_params(shape) / 1e9:.1f}B linear weights, LoRA r={args.r}, "
          f"{batch_size} x {seq_len} tokens per rank (estimates; see presets.estimate_bytes)")
    for world in (1, 2, 4, 8):
        est = presets.estimate_bytes(shape, args.r, batch_size, seq_len, world)
        print(f"  {world} rank{'s' if world > 1 else ' '}: {est['total'] / 2**30:6.1f} GiB per rank "
              f"(NF4 base {est['nf4_weights'] / 2**30:.1f} GiB)")
    need = presets.ranks_needed(shape, rank_bytes, args.r, batch_size, seq_len)
    where = f"ranks of {rank_bytes / 2**30:.1f} GiB"
    print(f"  fewest {where}: {need}" if need else f"  more than 64 {where}")


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, run, run_preset

    # Options left out (None) take the defaults of FinetuneConfig / run_preset.
    given = {name: value for name, value in vars(args).items() if value is not None and value is not False}
    if not args.preset and any(name in given for name in PRESET_ONLY):
        raise ValueError("--estimate, --rank-memory, --memory-only, --estimate-step and --lora16 measure a "
                         "--preset model; give --preset NAME")
    if args.preset and args.estimate:
        _print_estimate(args)
        return 0
    if args.preset:
        unused = [f"--{name.replace('_', '-')}" for name in PRESET_UNUSED if name in given]
        if unused:
            raise ValueError(f"--preset builds its own random-weight model and times LoRA steps on it; "
                             f"it does not take {', '.join(unused)}")
        if args.estimate_step:
            return _estimate_step(args, given)
        if args.memory_only:
            return _memory_only(args, given)
        run_preset(args.preset, device=args.device, steps=args.steps or 4, batch_size=args.batch_size,
                   seq_len=args.seq_len, r=args.r, alpha=args.alpha, seed=args.seed,
                   output_dir=args.output_dir or "runs", quiet=args.quiet,
                   fuse=args.fuse, liger=args.liger, offload=args.offload, lora16=args.lora16,
                   **({"lr": args.lr} if args.lr is not None else {}))
        return 0
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{name: value for name, value in given.items() if name in fields})
    # (given drops False: --no-fuse / --no-liger / --no-offload are passed here as they are)
    config.fuse, config.liger, config.offload = args.fuse, args.liger, args.offload
    from .finetune.multirank import run_multirank, world_size_from_env

    if world_size_from_env() > 1:  # started by torchrun
        import torch.distributed as dist

        try:
            run_multirank(config)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    summary = run(config)
    print(f"wrote {config.output_dir}/summary.json and {config.output_dir}/{summary['plot']}")
    return 0


def _memory_only(args: argparse.Namespace, given: dict) -> int:
    from .finetune.strategy_memory import format_peaks, step_peaks

    unused = [f"--{name.replace('_', '-')}" for name in ("steps", "lr") if name in given]
    if unused:
        raise ValueError(f"--memory-only measures one step and trains nothing; it does not take {', '.join(unused)}")
    from .finetune import speedups

    chosen = speedups.resolve(args.fuse, args.liger, args.offload)
    result = step_peaks(args.preset, device=args.device, batch_size=args.batch_size or 1,
                        seq_len=args.seq_len or 512, r=args.r, alpha=args.alpha,
                        fuse=chosen.fuse is not False, liger=chosen.liger, offload=chosen.offload)
    print(format_peaks(result))
    _write_result(args.output_dir, f"memory-{args.preset}.json", result)
    return 0


def _estimate_step(args: argparse.Namespace, given: dict) -> int:
    from .finetune import speedups
    from .finetune.step_estimate import estimate_step, format_estimate

    unused = [f"--{name.replace('_', '-')}" for name in ("steps", "lr", "memory_only", "device") if name in given]
    if unused:
        raise ValueError(f"--estimate-step estimates one step on the meta device; it does not take "
                         f"{', '.join(unused)}")
    chosen = speedups.resolve(None, args.liger, args.offload)
    result = estimate_step(args.preset, batch_size=args.batch_size or 1, seq_len=args.seq_len or 2048,
                           r=args.r, alpha=args.alpha, liger=chosen.liger, offload=chosen.offload)
    print(format_estimate(result))
    _write_result(args.output_dir, f"step-estimate-{args.preset}.json", result)
    return 0


def _write_result(output_dir: str | None, name: str, result: dict) -> None:
    """``result`` as ``output_dir/name`` (atomically), when an output folder was given."""
    if not output_dir:
        return
    from .finetune.report import write_json

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / name, result)
    print(f"wrote {out / name}")


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


SUBCOMMANDS = {
    "finetune": ("pre-train a small LLaMA, then fine-tune it with QLoRA and 16-bit LoRA side by side",
                 add_finetune_arguments, run_finetune),
    "bench": ("run the benchmark suite: every op and the LoRA layer against bitsandbytes, torchao and bf16 "
              "(options: `qlora-triton bench --help`)", add_bench_arguments, run_bench),
}
# Subcommands whose options belong to the tool they hand over to (-h/--help included).
PASSTHROUGH = {"bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-triton", description="qlora_triton tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text,
                                     add_help=name not in PASSTHROUGH))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return SUBCOMMANDS[args.command][2](args)
    except (ValueError, MemoryError) as err:
        print(f"qlora-triton {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional package: name the extra that installs it
        from .extras import EXTRA_OF, missing_extra_message

        if (err.name or "").split(".")[0] not in EXTRA_OF:
            raise
        print(f"qlora-triton {args.command}: error: "
              f"{missing_extra_message(err.name, f'qlora-triton {args.command}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
