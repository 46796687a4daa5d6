"""The ``qlora-triton`` console script: one subcommand per tool.

``finetune`` is here; other subcommands (``bench``) register the same way:
a function that adds its arguments and one that runs them.
"""

from __future__ import annotations

import argparse
import sys


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder (default: pre-train the bundled small LLaMA)")
    p.add_argument("--data", help="local .txt, or .jsonl with a 'text' field (default: the bundled task 2)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per method (default: by device)")
    p.add_argument("--pretrain-steps", type=int, help="fp32 pre-training steps of the bundled model")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: by device)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: by device)")
    p.add_argument("--lr", type=float, default=5e-3, help="fine-tuning learning rate (default 5e-3)")
    p.add_argument("--output-dir", help="where summary.json and loss.png go (default runs/finetune-<time>)")
    p.add_argument("--save-adapter", nargs="?", const="", default=None, metavar="DIR",
                   help="save the QLoRA adapter in PEFT format (default DIR: <output-dir>/adapter)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="NF4 ops: auto = Triton on CUDA, the torch reference on the CPU")
    p.add_argument("--preset", choices=("tiny", "7b", "13b", "33b", "65b"),
                   help="instead: build a LLaMA-1-shaped NF4 model of this size and time a few LoRA steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, run, run_preset

    if args.preset:
        run_preset(args.preset, device=args.device, steps=args.steps or 4, batch_size=args.batch_size,
                   seq_len=args.seq_len, r=args.r, alpha=args.alpha, seed=args.seed,
                   output_dir=args.output_dir or "runs", quiet=args.quiet)
        return 0
    config = FinetuneConfig(model=args.model, data=args.data, r=args.r, alpha=args.alpha, dropout=args.dropout,
                            steps=args.steps, pretrain_steps=args.pretrain_steps, batch_size=args.batch_size,
                            seq_len=args.seq_len, lr=args.lr, output_dir=args.output_dir,
                            save_adapter=args.save_adapter, device=args.device, seed=args.seed,
                            backend=args.backend, quiet=args.quiet)
    summary = run(config)
    print(f"wrote {config.output_dir}/summary.json and {config.output_dir}/{summary['plot']}")
    return 0


SUBCOMMANDS = {
    "finetune": ("pre-train a small LLaMA, then fine-tune it with QLoRA and 16-bit LoRA side by side",
                 add_finetune_arguments, run_finetune),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-triton", description="qlora_triton tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return SUBCOMMANDS[args.command][2](args)
    except (ValueError, MemoryError) as err:
        print(f"qlora-triton {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
