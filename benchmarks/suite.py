"""The runner: every case on every provider, one JSON document, one folder.

    python -m benchmarks            # full run; needs CUDA; writes benchmarks/results/<gpu>-<date>/
    python -m benchmarks --smoke    # every case once at tiny size on the CPU; writes to a temp folder
    qlora-triton bench [...]        # the same, through the package's console script
    python benchmarks/bench_matmul.py [...]     # the same runner, restricted to one op family
    python benchmarks/bench_optimizer.py [...]  # (see ``main``'s ``ops``)

A provider that is missing or fails shows in its column as "not installed" or
"error: ...", never as a crash of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
import triton

import qlora_triton
from qlora_triton import strategy as strategy_mod

from . import report
from .cases import OPS, SHAPES, SMOKE_SHAPES, Case, all_cases
from .estimates import estimate, launched_config
from .providers import (MAX_REL_ERR, PROVIDERS, Checked, NotApplicable, WeightCache, build, provider_status,
                        rotation_bytes)
from .schema import SCHEMA_VERSION, validate
from .strategy_memory import OPS as MEMORY_OPS
from .strategy_memory import extra_peak_bytes
from .timing import Ceilings, Timer, free_device_memory, measure_ceilings, measure_memory, rotation_copies

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _capture(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def gpu_slug(name: str) -> str:
    """"NVIDIA H200" -> "h200"; the results folder's prefix."""
    slug = re.sub(r"^nvidia\s+", "", name.strip().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return slug or "gpu"


def environment(device: torch.device, smoke: bool, timer: Timer, argv: list[str],
                git_commit: str | None = None, prog: str = "python -m benchmarks") -> dict[str, Any]:
    """What a reader needs to trust or reproduce the numbers."""
    import triton

    import qlora_triton

    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    driver = _capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None
    # A copy of the tree without .git (the GPU machine's) gets the commit from --git-commit.
    commit = git_commit or _capture(["git", "rev-parse", "HEAD"])
    status = None if git_commit else _capture(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": gpu,
        "gpu_slug": gpu_slug(gpu) if cuda else "cpu",
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "torchao": _version("torchao"),
        "qlora_triton": qlora_triton.__version__,
        "git_commit": commit,
        "git_dirty": None if git_commit or not commit else status is not None,
        "smoke": smoke,
        "timer": timer.name,
        "command": " ".join([prog, *argv]),
    }


class WrongResult(Exception):
    """A provider's output disagrees with fp32 arithmetic on its own weight."""


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


_STRATEGY_OPS = ("matmul_fwd", "matmul_grad_input", "lora_fwd_bwd")


def run_case(case: Case, provider: str, status: str | None, timer: Timer, ceilings: Ceilings,
             cache: WeightCache, time_strategies: bool = False) -> dict[str, Any]:
    """One row of the results: time, memory and floor of ``case`` on ``provider``;
    ``time_strategies``: also time each qlora_triton matmul strategy (strategy_ms)."""
    device = timer.device
    floor, bound = case.floor_ms(ceilings.copy_gbps, ceilings.matmul_tflops)
    row = {
        "case": case.id, "op": case.op, "shape": case.shape_str,
        "n": case.shape[0] if case.shape else None, "k": case.shape[1] if case.shape else None,
        "m": case.m, "params": case.params, "variant": case.variant, "provider": provider,
        "status": "ok", "error": None, "ms": None, "peak_mem_MB": None, "resident_mem_MB": None,
        "bytes": case.bytes_moved(), "flops": case.flops(), "floor_ms": floor, "bound": bound,
        "x_floor": None, "copies": None, "rel_err": None,
    }
    if provider == "qlora_triton":
        row["sass_estimate"] = estimate(case, triton.__version__, launched_config(case))
    if status is not None:  # the provider did not import
        row["status"] = "not installed" if status == "not installed" else "error"
        row["error"] = status
        return row
    fn = None
    before = strategy_mod.strategies.copy()
    if provider == "qlora_triton":
        qlora_triton.release_scratch()  # a dequant case's peak then includes its own scratch
    try:
        # Memory on a fresh single instance (no rotation copies, no cache),
        # which is also what is timed when the working set already beats L2.
        fn, row["peak_mem_MB"], row["resident_mem_MB"] = measure_memory(lambda: build(provider, case, device),
                                                                         device)
        if isinstance(fn, Checked):
            row["rel_err"] = err = fn.check()
            if not err <= MAX_REL_ERR:  # NaN fails too
                raise WrongResult(f"rel_err {err:.3g} against fp32 on the same weight (> {MAX_REL_ERR})")
        copies = rotation_copies(rotation_bytes(provider, case), device)
        if copies > 1:
            fn = None
            free_device_memory(device)
            fn = build(provider, case, device, copies, cache)
        row["ms"] = timer(fn)
        row["copies"] = copies
        row["x_floor"] = row["ms"] / floor if floor > 0 else None
        if time_strategies and provider == "qlora_triton" and case.op in _STRATEGY_OPS:
            row["strategy_ms"] = _time_strategies(case, fn, timer)
    except NotApplicable:
        row.update(status="n/a", error=None, peak_mem_MB=None, resident_mem_MB=None)
    except Exception as e:  # one provider failing must not stop the others
        row.update(status="error", error=_error_text(e), ms=None, x_floor=None, copies=None)
    finally:
        fn = None
        free_device_memory(device)
        if provider == "qlora_triton":
            row["strategy"] = _strategy_ran(case.op, strategy_mod.strategies - before)
    if provider == "qlora_triton" and case.op in MEMORY_OPS and row["status"] == "ok":
        try:  # device accounting on CUDA, meta tensor accounting on the CPU (the row says which)
            row["strategy_memory"], row["strategy_extra_peak_bytes"] = extra_peak_bytes(case, device)
        except Exception as e:
            row.update(status="error", error=_error_text(e), ms=None, x_floor=None, copies=None)
        finally:
            free_device_memory(device)
    return row


def _time_strategies(case: Case, fn: Callable[[], object], timer: Timer) -> dict[str, float | None]:
    """ms of ``fn`` under each forced strategy; None where a strategy would run
    another's code (the GEMV takes M <= 16, and grad-input has none)."""
    out: dict[str, float | None] = {}
    for name in strategy_mod.STRATEGIES:
        if name == "gemv" and (case.m > strategy_mod.GEMV_MAX_M or case.op == "matmul_grad_input"):
            out[name] = None
            continue
        with strategy_mod.force_strategy(name):
            out[name] = timer(fn)
    return out


def _strategy_ran(op: str, ran) -> str | None:
    """The matmul strategy (qlora_triton.strategy) that ran for ``op``'s base
    product: the forward's, grad-input's for matmul_grad_input; None when no
    product ran on the Triton backend (the reference, quantize, ...)."""
    kind = "grad_input" if op == "matmul_grad_input" else "forward"
    names = {name for (which, name) in ran if which == kind}
    return names.pop() if len(names) == 1 else None


@dataclasses.dataclass
class RunOptions:
    """What to run and how; the command line fills it."""

    smoke: bool = False
    ops: tuple[str, ...] = OPS
    providers: tuple[str, ...] = PROVIDERS
    shapes: tuple[tuple[int, int], ...] | None = None  # a subset of the run's shapes (None: all)
    ms: tuple[int, ...] | None = None  # a subset of the run's M values (None: all)
    strategy: str | None = None  # qlora_triton's matmul strategy for the run (None: its own choice)
    time_strategies: bool = False  # also time every strategy in each qlora_triton matmul row
    prog: str = "python -m benchmarks"  # recorded in meta.command
    progress: bool = True
    argv: list[str] = dataclasses.field(default_factory=list)  # recorded in meta.command
    git_commit: str | None = None  # for a tree without .git
    done: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # rows kept from an earlier run
    on_row: Callable[[dict[str, Any]], None] | None = None  # called with each new row as it completes


def run_suite(opts: RunOptions, timer: Timer | None = None) -> dict[str, Any]:
    """Run the cases and return the results document (see schema.py)."""
    device = torch.device("cpu" if opts.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the full benchmark needs a CUDA device; on the CPU run `python -m benchmarks --smoke`")
    timer = timer or Timer(device, cpu_reps=1 if opts.smoke else 3)
    statuses = {p: provider_status(p) for p in opts.providers}
    # Everything imported so far lives for the whole run: take it out of the
    # collector's view, so that the collections between cases (which free the
    # last case's device memory) cost microseconds, not half a second each.
    gc.freeze()
    try:
        ceilings = measure_ceilings(timer, opts.smoke)
        with strategy_mod.force_strategy(opts.strategy):
            rows = _run_cases(all_cases(opts.smoke, opts.ops, opts.shapes, opts.ms), opts, statuses, timer,
                              ceilings)
    finally:
        gc.unfreeze()  # at exit, nanobind (Triton) reports frozen objects as leaks
    doc = {
        "schema_version": SCHEMA_VERSION,
        "meta": {**environment(device, opts.smoke, timer, opts.argv, opts.git_commit, opts.prog),
                 "strategy": opts.strategy},
        "ceilings": {"copy_GBps": ceilings.copy_gbps, "matmul_TFLOPs": ceilings.matmul_tflops,
                     "copy_bytes": ceilings.copy_bytes, "matmul_size": ceilings.matmul_size},
        "providers": {p: statuses[p] or "ok" for p in opts.providers},
        "results": rows,
    }
    errors = validate(doc)
    if errors:  # a bug of the suite itself: say so loudly rather than write a bad file
        raise RuntimeError("results do not match the schema:\n" + "\n".join(errors[:20]))
    return doc


def _run_cases(cases: list[Case], opts: RunOptions, statuses: dict[str, str | None], timer: Timer,
               ceilings: Ceilings) -> list[dict[str, Any]]:
    from tqdm import tqdm

    done = {(r["case"], r["provider"]): r for r in opts.done}
    cache, cache_key, rows = WeightCache(), None, []
    todo = [c for c in cases if any((c.id, p) not in done for p in opts.providers)]
    bar = tqdm(total=len(todo), desc="benchmarks", unit="case", disable=not opts.progress, file=sys.stderr)
    for case in cases:
        if case in todo:
            bar.set_postfix_str(case.id)
        key = (case.op, case.shape)
        if key != cache_key:  # a new shape: its weights replace the last shape's
            cache.clear()
            free_device_memory(timer.device)
            cache_key = key
        torch.manual_seed(0)
        for provider in opts.providers:
            row = done.get((case.id, provider))
            if row is not None:  # kept from an earlier run: its floor from this run's ceilings
                floor, bound = case.floor_ms(ceilings.copy_gbps, ceilings.matmul_tflops)
                row = dict(row, floor_ms=floor, bound=bound,
                           x_floor=row["ms"] / floor if row["ms"] is not None and floor > 0 else None)
            else:
                row = run_case(case, provider, statuses[provider], timer, ceilings, cache, opts.time_strategies)
                if opts.on_row:
                    opts.on_row(row)
            rows.append(row)
        if case in todo:
            bar.update()
    bar.close()
    cache.clear()
    return rows


def output_dir(smoke: bool, out: str | None, results_root: str | None = None, tag: str = "") -> pathlib.Path:
    """--out if given; a temp folder for --smoke; else <results root>/<gpu>-<date>[-<tag>]/
    (a per-op script's tag keeps it from overwriting the whole suite's folder)."""
    if out:
        return pathlib.Path(out)
    if smoke and not results_root:
        return pathlib.Path(tempfile.mkdtemp(prefix="qlora-bench-smoke-"))
    root = pathlib.Path(results_root) if results_root else RESULTS
    slug = "cpu" if smoke else gpu_slug(torch.cuda.get_device_name())
    return root / f"{slug}-{datetime.datetime.now(datetime.timezone.utc).date().isoformat()}" \
        f"{'-' + tag if tag else ''}"


def _shape(text: str) -> tuple[int, int]:
    n, _, k = text.lower().partition("x")
    try:
        return int(n), int(k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxK (out x in features), got {text!r}") from None


def parse_args(argv: list[str], prog: str = "python -m benchmarks", ops: tuple[str, ...] = OPS,
               default_ops: tuple[str, ...] | None = None) -> argparse.Namespace:
    """The options; ``ops`` are the ops this entry point may run (the per-op
    scripts narrow them), ``default_ops`` what runs without ``--ops`` (all of them)."""
    default_ops = default_ops or ops
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every case and provider once at tiny size on the CPU (CI); writes to a temp folder")
    parser.add_argument("--out", help="folder for results.json, results.md, rows.jsonl and the plots "
                                      "(default: benchmarks/results/<gpu>-<date>/, or a temp folder with --smoke)")
    parser.add_argument("--results-root", help="write to RESULTS_ROOT/<gpu>-<date>/ instead of benchmarks/results/")
    parser.add_argument("--git-commit", help="the commit to record, for a copy of the tree without .git")
    parser.add_argument("--ops", default=",".join(default_ops), help=f"comma-separated subset of {','.join(ops)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--shapes", help="comma-separated subset of the run's NxK weight shapes, e.g. 4096x4096 "
                                         "(full run: " + ",".join(f"{n}x{k}" for n, k in SHAPES) + "; --smoke: "
                                         + ",".join(f"{n}x{k}" for n, k in SMOKE_SHAPES) + ")")
    parser.add_argument("--m", help="comma-separated subset of the run's M values (rows of x) for the matmul "
                                    "and LoRA cases, e.g. 1,16,4096")
    parser.add_argument("--strategy", choices=strategy_mod.STRATEGIES,
                        help="run qlora_triton's matmuls with this strategy (qt.force_strategy); default: "
                             "the package's choice. Each qlora_triton row records the strategy that ran")
    parser.add_argument("--time-strategies", action="store_true",
                        help="also time gemv, fused and dequant side by side in each qlora_triton matmul and "
                             "LoRA row (strategy_ms)")
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up budget per timing (CUDA)")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetition budget per timing (CUDA)")
    parser.add_argument("--resume", metavar="ROWS_JSONL",
                        help="keep the rows of an earlier, cut-short run (its rows.jsonl) and run only the rest")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    args.ops = tuple(o for o in args.ops.split(",") if o)
    args.providers = tuple(p for p in args.providers.split(",") if p)
    bad = [o for o in args.ops if o not in ops] + [p for p in args.providers if p not in PROVIDERS]
    if bad:
        parser.error(f"unknown op or provider: {', '.join(bad)}")
    try:
        args.shapes = tuple(_shape(t) for t in args.shapes.split(",") if t) if args.shapes else None
        args.m = tuple(int(t) for t in args.m.split(",") if t) if args.m else None
        all_cases(args.smoke, args.ops, args.shapes, args.m)  # unknown shapes or M values fail here
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks", ops: tuple[str, ...] = OPS,
         default_ops: tuple[str, ...] | None = None, tag: str = "", per_provider: bool = False) -> int:
    """The command line. The per-op scripts call it with their ``ops``, a
    ``tag`` for their default results folder, and ``per_provider`` for their
    table (one line per case and provider, with TFLOP/s and GB/s)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog, ops, default_ops)
    start = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(f"the full benchmark needs a CUDA device; on the CPU run `{prog} --smoke`")
    out = output_dir(args.smoke, args.out, args.results_root, tag)
    out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in pathlib.Path(args.resume).read_text().splitlines() if line.strip()] \
        if args.resume else []
    # Each row is appended to rows.jsonl as it completes: a run cut short (a time
    # limit) leaves its rows behind, and --resume rows.jsonl finishes it.
    rows_file = (out / "rows.jsonl").open("a" if args.resume and pathlib.Path(args.resume) == out / "rows.jsonl"
                                          else "w")

    def on_row(row: dict[str, Any]) -> None:
        rows_file.write(json.dumps(row) + "\n")
        rows_file.flush()

    if done and rows_file.mode == "w":
        for row in done:
            on_row(row)
    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=1 if args.smoke else 3)
    opts = RunOptions(smoke=args.smoke, ops=args.ops, providers=args.providers, shapes=args.shapes, ms=args.m,
                      strategy=args.strategy, time_strategies=args.time_strategies,
                      progress=not args.no_progress, argv=argv, prog=prog, git_commit=args.git_commit, done=done,
                      on_row=on_row)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library chatter (bnb on the CPU, torchao) would bury the table
            doc = run_suite(opts, timer)
    finally:
        rows_file.close()
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    plots = [] if args.no_plots else report.write_plots(doc, out)
    (out / "results.md").write_text(report.markdown(doc, plots))
    print(report.per_provider_console(doc) if per_provider else report.console_table(doc))
    print(f"\n{len(doc['results'])} rows ({len(done)} resumed) in {time.perf_counter() - start:.0f} s")
    print(f"results: {out}/results.json, results.md" + (f", {len(plots)} plots" if plots else ""))
    return 0
