"""The summary: ``summary.json``, ``loss.png`` and the side-by-side table.

``summary.json`` keys (``SUMMARY_KEYS``; each phase has ``PHASE_KEYS``):

* ``config``: every option of the run, resolved (device, sizes, seed, ...);
* ``environment``: torch / transformers / peft versions, device name;
* ``pretrain``: the fp32 pre-training on task 1 (``null`` with ``--model``);
* ``phases``: ``lora16`` and ``qlora``, each with ``train_loss`` (per step),
  ``eval_steps`` / ``eval_loss`` (held-out task-2 loss), ``initial_eval_loss``,
  ``final_eval_loss``, ``tokens_per_s``, ``train_seconds``,
  ``trainable_params``, ``weight_bytes``, ``memory`` (``kind``,
  ``peak_bytes``, ``baseline_bytes``, ``delta_bytes``; see ``memory.py``),
  ``bf16_matmul`` (``native``, or ``fp32``: the phase's bf16 matmuls and
  attention computed in fp32, see ``bf16_matmul.py``) and ``widened_ops``
  (how many calls of each op it widened);
* ``comparison``: ``eval_loss_ratio`` (QLoRA / 16-bit), ``within_5_percent``,
  ``weight_bytes_ratio`` and ``peak_memory_ratio`` (QLoRA / 16-bit);
* ``wall_seconds``, ``plot`` (file name of the PNG in the same folder).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import bf16_matmul

SUMMARY_KEYS = ("config", "environment", "pretrain", "phases", "comparison", "wall_seconds", "plot")
PHASE_KEYS = ("method", "title", "train_loss", "eval_steps", "eval_loss", "initial_eval_loss",
              "final_eval_loss", "tokens_per_s", "train_seconds", "tokens", "trainable_params",
              "weight_bytes", "memory", "targets", "bf16_matmul", "widened_ops")
COMPARISON_KEYS = ("eval_loss_ratio", "within_5_percent", "weight_bytes_ratio", "peak_memory_ratio")


def _environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "device_name": "cpu", "cpu_threads": torch.get_num_threads()}
    try:  # the installed version, without importing PEFT here (1.5-2 s on 2 CPU cores)
        env["peft"] = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        env["peft"] = None
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["cpu_native_bf16"] = bf16_matmul.native_bf16_supported()
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _memory_number(phase: dict) -> int:
    """The figure compared across phases: CUDA peak allocated, or the CPU RSS growth."""
    mem = phase["memory"]
    return mem["peak_bytes"] if mem["kind"].startswith("cuda") else mem["delta_bytes"]


def summarize(config, info: dict, phases: dict, wall_seconds: float) -> dict:
    q, l = phases["qlora"], phases["lora16"]
    ratio = q["final_eval_loss"] / l["final_eval_loss"]
    return {
        "config": asdict(config),
        "environment": _environment(config.device),
        "data": {k: info[k] for k in ("tokenizer", "vocab_size", "train_tokens", "eval_tokens")},
        "pretrain": info["pretrain"],
        "phases": phases,
        "comparison": {
            "eval_loss_ratio": ratio,
            "within_5_percent": abs(ratio - 1.0) <= 0.05,
            "weight_bytes_ratio": q["weight_bytes"] / l["weight_bytes"],
            "peak_memory_ratio": _memory_number(q) / max(_memory_number(l), 1),
        },
        "wall_seconds": wall_seconds,
        "plot": "loss.png",
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for key, color in (("lora16", "tab:blue"), ("qlora", "tab:orange")):
        phase = summary["phases"][key]
        losses = phase["train_loss"]
        ax_train.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.8, label=phase["title"])
        ax_eval.plot(phase["eval_steps"], phase["eval_loss"], "o-", color=color, label=phase["title"])
    ax_train.set(title="training loss (task 2)", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_eval.set(title="held-out loss (task 2)", xlabel="step", ylabel="cross-entropy (nats/token)")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON at ``path``, atomically: a hidden sibling, then
    a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write(summary: dict, out: Path) -> None:
    write_json(out / "summary.json", summary)
    plot(summary, out / summary["plot"])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(summary: dict) -> str:
    """The side-by-side table printed at the end of the run."""
    l, q = summary["phases"]["lora16"], summary["phases"]["qlora"]
    config = summary["config"]
    cuda = l["memory"]["kind"].startswith("cuda")
    rows = [
        ("", "16-bit LoRA", "QLoRA (NF4)"),
        ("eval loss before fine-tuning", f"{l['initial_eval_loss']:.4f}", f"{q['initial_eval_loss']:.4f}"),
        ("final eval loss", f"{l['final_eval_loss']:.4f}", f"{q['final_eval_loss']:.4f}"),
        ("final train loss", f"{l['train_loss'][-1]:.4f}", f"{q['train_loss'][-1]:.4f}"),
        ("tokens/s (training)", f"{l['tokens_per_s']:,.0f}", f"{q['tokens_per_s']:,.0f}"),
        ("weights in memory", _mib(l["weight_bytes"]), _mib(q["weight_bytes"])),
    ]
    if cuda:
        rows.append(("peak GPU memory (allocated)", _mib(l["memory"]["peak_bytes"]), _mib(q["memory"]["peak_bytes"])))
    else:
        rows.append(("peak RSS of the phase process", _mib(l["memory"]["peak_bytes"]), _mib(q["memory"]["peak_bytes"])))
        rows.append(("  of which added by the phase", _mib(l["memory"]["delta_bytes"]), _mib(q["memory"]["delta_bytes"])))
    rows.append(("trainable params", f"{l['trainable_params']:,}", f"{q['trainable_params']:,}"))
    shape = [f"{len(p['train_loss'])} x {config['batch_size']} x {config['seq_len']}" for p in (l, q)]
    rows.append(("steps x sequences x tokens", *shape))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>14}  {c:>14}" for a, b, c in rows]
    c = summary["comparison"]
    verdict = "within" if c["within_5_percent"] else "NOT within"
    lines.append("")
    lines.append(f"QLoRA / 16-bit LoRA final eval loss: {c['eval_loss_ratio']:.4f} ({verdict} 5%); "
                 f"weights {c['weight_bytes_ratio']:.2f}x; wall time {summary['wall_seconds']:.0f} s")
    pre = summary.get("pretrain")
    if pre:
        lines.append(f"Pre-training (fp32, task 1): {len(pre['train_loss'])} x {config['batch_size']} x "
                     f"{config['seq_len']} in {pre['seconds']:.0f} s; held-out task-1 loss "
                     f"{pre['eval_loss'][0]:.2f} -> {pre['eval_loss'][-1]:.2f}.")
    lines.append(bf16_matmul.describe(config.get("bf16_matmul", "native")) + ".")
    if not cuda:
        lines.append("CPU memory: peak RSS includes Python and the libraries; 'added by the phase' is the "
                     "RSS growth after the imports. The NF4 reference path dequantizes one weight at a time "
                     "during its matmul, so 'weights in memory' shows the 4-bit saving best here.")
    return "\n".join(lines)
