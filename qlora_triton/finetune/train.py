"""The loops: pre-train, then fine-tune twice (QLoRA and 16-bit LoRA).

``run(config)`` is the whole default flow:

1. build (or load) the model and the data; pre-train the bundled model in
   fp32 on task 1 and save it to ``<output>/pretrained``;
2. one Python process per fine-tuning phase (``phase.py``), so that each
   phase's peak memory is its own (started at the beginning, so that their
   imports overlap the pre-training): first 16-bit LoRA, then QLoRA, on the same
   base weights, the same initial adapter, the same batches in the same order,
   and the same LoRA and optimizer settings;
3. the summary JSON, the loss plot and the side-by-side table (``report.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import presets
from .model import build_llama
from .step import timed_step

METHODS = ("lora16", "qlora")


@dataclass
class FinetuneConfig:
    model: str | None = None          # local Hugging Face folder; None: the bundled model
    data: str | None = None           # local .txt / .jsonl; None: bundled task 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    steps: int | None = None          # fine-tuning steps per phase; None: the device default
    pretrain_steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float = 5e-3
    pretrain_lr: float = 1e-2
    output_dir: str | None = None
    save_adapter: str | None = None   # "" -> <output_dir>/adapter
    device: str | None = None
    seed: int = 0
    backend: str = "auto"             # auto | triton | torch (the NF4 ops' backend)
    # auto | native | fp32: how both phases run bf16 matmuls; resolve() turns auto into
    # fp32 on a CPU without native bf16, native elsewhere (bf16_matmul.py)
    bf16_matmul: str = "auto"
    eval_every: int | None = None
    quiet: bool = False
    # QLoRA phase options (speedups.py): None = the default (fused blocks where the
    # package has them, Liger on, offload off)
    fuse: bool | None = None
    liger: bool | None = None
    offload: bool | None = None
    # model and data sizes; resolve() fills the device's defaults (presets.DEFAULT_SIZES)
    size: dict = field(default_factory=dict)

    def resolve(self) -> "FinetuneConfig":
        """Fill every ``None`` default from the device's size (``presets.DEFAULT_SIZES``)."""
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device: expected cpu or cuda, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but torch sees no CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu or cuda, got {self.device!r}")
        # ``size`` given by the caller overrides single entries (tests use a smaller model).
        size = {**presets.DEFAULT_SIZES[device.type], **self.size}
        self.size = size
        for name in ("steps", "pretrain_steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) is None:
                setattr(self, name, size[name])
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.save_adapter == "":
            self.save_adapter = str(Path(self.output_dir) / "adapter")
        for name in ("r", "steps", "pretrain_steps", "batch_size", "seq_len", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "pretrain_steps" else 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected 0 <= p < 1, got {self.dropout!r}")
        if self.lr <= 0 or self.alpha <= 0:
            raise ValueError(f"lr and alpha must be positive, got lr={self.lr!r}, alpha={self.alpha!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected auto, triton or torch, got {self.backend!r}")
        from . import bf16_matmul, speedups

        self.bf16_matmul = bf16_matmul.resolve(self.bf16_matmul, device)
        chosen = speedups.resolve(self.fuse, self.liger, self.offload)
        self.fuse, self.liger, self.offload = chosen.fuse, chosen.liger, chosen.offload
        self.check_paths()
        return self

    def check_paths(self) -> None:
        """The folders and files named, checked before any work (the phases run in
        child processes: an error there would come as a second traceback)."""
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: {self.model!r} is not a Hugging Face model folder (no config.json)")
        if self.data is not None:
            if not Path(self.data).is_file():
                raise ValueError(f"data: no such file {self.data!r}")
            if Path(self.data).suffix not in (".txt", ".jsonl"):
                raise ValueError(f"data: expected a .txt or .jsonl file, got {self.data!r}")
        for name in ("output_dir", "save_adapter"):
            value = getattr(self, name)
            if value and Path(value).exists() and not Path(value).is_dir():
                raise ValueError(f"{name}: {value!r} exists and is not a folder")


def pick_backend(config: FinetuneConfig) -> str | None:
    """The NF4 ops' backend for a phase: ``None`` keeps the package's rule.

    ``auto`` on the CPU runs the plain-torch reference even when the process
    has ``TRITON_INTERPRET=1``: the interpreter checks the kernels' results, it
    is far too slow to train with."""
    if config.backend == "auto":
        return "torch" if torch.device(config.device).type == "cpu" else None
    return config.backend


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device, separator: int | None = None) -> float:
    """Mean next-token cross-entropy over the held-out windows (token-weighted),
    packed per sequence as training is (``separator``: see ``data.packed_inputs``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        inputs = data_mod.packed_inputs(batch.to(device), separator)
        n = int((inputs["labels"][:, 1:] != -100).sum())  # predicted tokens
        total += model(**inputs).loss.float().item() * n
        count += n
    model.train(was_training)
    return total / count


def cosine_schedule(optimizer, steps: int, floor: float = 0.1):
    """Cosine decay from the set lr to ``floor`` times it over ``steps`` (no warm-up).

    Decaying makes the final losses settle instead of depending on where the
    last few large steps happened to land, so two runs compare fairly."""
    def factor(step: int) -> float:
        # (steps = 0: --pretrain-steps 0 trains nothing; the factor is never used)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(model, optimizer, stream: data_mod.TokenStream, starts: torch.Tensor, seq_len: int,
               device: torch.device, eval_batches: list[torch.Tensor], eval_every: int,
               desc: str, quiet: bool = False) -> dict:
    """Steps over ``starts`` (one row per step); eval at 0, every ``eval_every`` and at the end.

    ``tokens_per_s`` counts training steps only (forward, backward, optimizer),
    not evaluation."""
    model.train()
    losses, eval_steps, eval_losses = [], [0], [evaluate(model, eval_batches, device, stream.separator)]
    train_seconds, tokens = 0.0, 0
    steps = starts.shape[0]
    schedule = cosine_schedule(optimizer, steps)
    bar = tqdm(range(steps), desc=desc, disable=quiet, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in stream.batch_inputs(starts[step], seq_len).items()}  # packed per sentence
        loss, seconds = timed_step(model, inputs, optimizer, device)
        schedule.step()
        train_seconds += seconds
        tokens += inputs["input_ids"].numel()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            eval_steps.append(step + 1)
            eval_losses.append(evaluate(model, eval_batches, device, stream.separator))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", eval=f"{eval_losses[-1]:.3f}")
    return {"train_loss": losses, "eval_steps": eval_steps, "eval_loss": eval_losses,
            "initial_eval_loss": eval_losses[0], "final_eval_loss": eval_losses[-1],
            "train_seconds": train_seconds, "tokens": tokens,
            "tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0}


def prepare(config: FinetuneConfig, out: Path) -> dict:
    """Data, tokenizer and base model for the phases; pre-trains the bundled model.

    Writes ``<out>/data.pt`` (token streams and the shared batch order) and,
    for the bundled model, ``<out>/pretrained`` (a Hugging Face folder)."""
    device = torch.device(config.device)
    tokenizer = data_mod.HFTokenizer(config.model) if config.model else data_mod.CharTokenizer()
    if config.data:
        train_text, eval_text = data_mod.split_text(data_mod.read_text_file(config.data))
    else:
        n = config.size["task2_sentences"]
        train_text = data_mod.task_text(2, n, seed=config.seed + 2)
        eval_text = data_mod.task_text(2, max(n // 10, 64), seed=config.seed + 1002)
    train = data_mod.TokenStream.from_text(train_text, tokenizer)
    held_out = data_mod.TokenStream.from_text(eval_text, tokenizer)
    train.check(config.seq_len, "data (train split)")
    held_out.check(config.seq_len, "data (held-out split)")
    starts = train.batch_starts(config.steps, config.batch_size, config.seq_len, seed=config.seed + 3)
    torch.save({"train": train.ids, "eval": held_out.ids, "starts": starts, "separator": train.separator},
               out / "data.pt")

    info: dict = {"tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                  "train_tokens": train.ids.numel(), "eval_tokens": held_out.ids.numel()}
    if config.model:
        info["model_dir"] = config.model
        info["pretrain"] = None
        return info

    shape = presets.bundled_shape(config.size, tokenizer.vocab_size, config.seq_len)
    model = build_llama(shape, seed=config.seed, device=device)
    pre_text = data_mod.task_text(1, config.size["task1_sentences"], seed=config.seed + 1)
    pre_stream = data_mod.TokenStream.from_text(pre_text, tokenizer)
    pre_eval = data_mod.TokenStream.from_text(data_mod.task_text(1, 64, seed=config.seed + 1001), tokenizer)
    pre_starts = pre_stream.batch_starts(config.pretrain_steps, config.batch_size, config.seq_len,
                                         seed=config.seed + 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    result = train_loop(model, optimizer, pre_stream, pre_starts, config.seq_len, device,
                        pre_eval.eval_batches(config.seq_len, config.batch_size, 32),
                        eval_every=max(config.pretrain_steps, 1), desc="pre-train (fp32, task 1)",
                        quiet=config.quiet)
    task2_eval = evaluate(model, held_out.eval_batches(config.seq_len, config.batch_size,
                                                       config.size["eval_windows"]), device,
                          held_out.separator)
    result.update(seconds=time.perf_counter() - t0, task2_eval_loss=task2_eval,
                  shape=shape.__dict__, params=sum(p.numel() for p in model.parameters()))
    model.save_pretrained(out / "pretrained")
    info.update(model_dir=str(out / "pretrained"), pretrain=result)
    return info


def phase_env() -> dict:
    """The environment of a phase process."""
    env = dict(os.environ)
    # The child must import this same package (a checkout that is not installed too).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    # Idle OpenMP threads sleep instead of spinning: measured here with another
    # job on the 2 cores, a training step ran 13x faster (0.37 -> 4.8 it/s).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class PhaseProcess:
    """One fine-tuning phase in its own Python process (``phase.py``), started
    before it is needed: the child imports torch, transformers, PEFT and the
    package (5-10 s on 2 CPU cores) while this process pre-trains, then waits
    for :meth:`run` to hand it the spec on stdin. Its peak memory stays its
    own: it loads no model before then."""

    def __init__(self, method: str, out: Path) -> None:
        self.method = method
        self.spec_path, self.result_path = out / f"{method}.spec.json", out / f"{method}.json"
        self.proc = subprocess.Popen([sys.executable, "-m", "qlora_triton.finetune.phase", "--wait", method,
                                      str(self.spec_path), str(self.result_path)],
                                     stdin=subprocess.PIPE, env=phase_env())

    def run(self, spec: dict) -> dict:
        """Hand the phase over and wait for its JSON result."""
        self.spec_path.write_text(json.dumps({**spec, "method": self.method}))
        try:
            self.proc.stdin.write(b"run\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died while importing: its traceback is above
            pass
        returncode = self.proc.wait()
        if returncode != 0:
            raise RuntimeError(f"the {self.method} phase failed (exit status {returncode}); its output is above")
        return json.loads(self.result_path.read_text())

    def cancel(self) -> None:
        """End a child that will not be given its phase (end of input: it exits)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_phase_process(method: str, spec: dict, out: Path) -> dict:
    """One fine-tuning phase in a fresh Python process; returns its JSON result."""
    return PhaseProcess(method, out).run(spec)


def run(config: FinetuneConfig) -> dict:
    """The whole flow; returns the summary that ``summary.json`` holds."""
    from . import report

    t_start = time.perf_counter()
    config.resolve()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The phase processes start now: their imports overlap the pre-training.
    workers = {method: PhaseProcess(method, out) for method in METHODS}
    try:
        info = prepare(config, out)
        spec = {"config": asdict(config), "model_dir": info["model_dir"], "data_path": str(out / "data.pt"),
                "init_adapter": str(out / "init_adapter"),
                "backend": pick_backend(config)}
        phases = {method: workers[method].run(spec) for method in METHODS}
    finally:
        for worker in workers.values():
            worker.cancel()
    summary = report.summarize(config, info, phases, wall_seconds=time.perf_counter() - t_start)
    report.write(summary, out)
    if not config.quiet:
        print(report.table(summary))
    return summary
