"""Peak memory of one LoRA training step of a ``--preset`` model, per matmul strategy.

The model is the preset's NF4 LLaMA (:func:`build_quantized_llama`): on CUDA
with random weights, measured by the caching allocator
(``torch.cuda.max_memory_allocated``); otherwise on the meta device, measured
by tensor accounting (:mod:`qlora_triton.tensor_memory`), where a 7B step takes
seconds and no memory. One step = forward (LM loss) + backward (gradient
checkpointing, as the preset) + an optimizer step of a fresh ``PagedAdamW``
(so its states are allocated inside the step), each a phase.

Under ``qt.force_strategy("dequant")`` the step holds the fused strategy's
tensors plus the one scratch buffer: one largest layer in the compute dtype
(for LLaMA-7B ``down_proj``/``up_proj``: 11008 x 4096 x 2 bytes in bf16).

Attention on meta: torch's math path would materialise the [B, H, S, S]
scores, which a GPU's flash kernel never holds; by default (``attention=
"flash"``) the model runs :mod:`.meta_attention` instead (torch's meta kernel
and autograd formula of flash attention: the output and an fp32 logsumexp,
no scores). ``attention="math"`` keeps the old accounting, for comparison.

Options (each a keyword of :func:`step_peaks`, the CLI's flags):

* ``liger``: :func:`qlora_triton.liger.apply_liger` (on meta, its torch path:
  the chunked linear cross-entropy, the analogue of Liger's fused one);
* ``offload``: :func:`qlora_triton.offload.offload_checkpoints` (the layer
  inputs wait on the host; on meta their bytes are recorded as host bytes);
* ``fuse``: ``qt.fuse`` (the fused decoder blocks).

The peak's breakdown (``peak_breakdown``) tags every allocation by where it
was made: the model's weights, checkpointed layer inputs, a decoder layer's
forward or recompute, embeddings/head/loss, backward gradients, optimizer.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from ..ops import scratch
from ..strategy import STRATEGIES, force_strategy, strategies
from ..tensor_memory import memory_meter
from ..training import enable_checkpointing
from .optimizer import paged_adamw
from .presets import LLAMA_SHAPES, build_quantized_llama


def _largest_layer_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    from ..linear import Linear4bit

    numel = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return numel * torch.empty((), dtype=dtype).element_size()


# Tags of the peak's breakdown (TensorMemory.tag), by where an allocation was made.
TAG_INPUTS = "checkpointed layer inputs"
TAG_LAYER = "decoder layer (forward / recompute)"
TAG_PHASE = {"forward": "embeddings, head and loss", "backward": "backward: gradients",
             "optimizer": "optimizer step and states"}


def _tagging(checkpoint_fn, meter):
    """Wrap a layer's checkpoint function so that the meter tags what the layer makes."""
    def tagged(function, *args, **kwargs):
        def run(*a, **k):
            previous, meter.tag = meter.tag, TAG_LAYER
            try:
                return function(*a, **k)
            finally:
                meter.tag = previous
        if args and isinstance(args[0], torch.Tensor):
            meter.retag(args[0], TAG_INPUTS)
        return checkpoint_fn(run, *args, **kwargs)
    tagged.untagged = checkpoint_fn
    return tagged


def _step(model, vocab_size: int, batch_size: int, seq_len: int, mask, optimizer, meter=None) -> None:
    """Forward, backward and optimizer step on random tokens, each a phase of ``meter``."""
    import contextlib

    def phase(name):
        if meter is None:
            return contextlib.nullcontext()
        if hasattr(meter, "tag"):
            meter.tag = TAG_PHASE[name]
        return meter.phase(name)

    layers = []
    if meter is not None and hasattr(meter, "retag"):
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                  and hasattr(m, "_gradient_checkpointing_func")]
        for m in layers:
            m._gradient_checkpointing_func = _tagging(m._gradient_checkpointing_func, meter)
    device = next(model.parameters()).device
    try:
        with phase("forward"):
            batch = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
            loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
        with phase("backward"):
            loss.backward()
            del loss, batch
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for m in layers:
            m._gradient_checkpointing_func = m._gradient_checkpointing_func.untagged


def step_peaks(preset: str = "7b", device: str | torch.device | None = None, batch_size: int = 1,
               seq_len: int = 512, r: int = 8, alpha: float = 16.0,
               strategies_to_run: tuple = STRATEGIES, dtype: torch.dtype = torch.bfloat16,
               liger: bool = False, offload: bool = False, fuse: bool = False,
               attention: str = "flash") -> dict:
    """``{"device", "kind", "tokens", "largest_layer_bytes", "options", "strategies": {name:
    {"peak_bytes", "baseline_bytes", "phases", "ran", "scratch_buffers", "peak_breakdown",
    "offload"}}}`` for one LoRA step of ``preset`` under each strategy (device default: CUDA if
    available, else meta); ``liger``, ``offload``, ``fuse``, ``attention``: see the module."""
    import qlora_triton as qt
    from . import meta_attention, speedups

    if attention not in ("flash", "math"):
        raise ValueError(f"attention: expected 'flash' or 'math', got {attention!r}")
    for flag, value in (("liger", liger), ("offload", offload), ("fuse", fuse)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
    chosen = speedups.resolve(fuse=fuse, liger=liger, offload=offload)

    if preset not in LLAMA_SHAPES:
        raise ValueError(f"preset: expected one of {sorted(LLAMA_SHAPES)}, got {preset!r}")
    for name in strategies_to_run:
        if name not in STRATEGIES:
            raise ValueError(f"strategies_to_run: expected names from {STRATEGIES}, got {name!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "meta"))
    if dev.type not in ("cuda", "meta"):
        raise ValueError(f"device: the step's memory is measured on cuda or meta, got {dev}")
    shape = LLAMA_SHAPES[preset]
    model = build_quantized_llama(shape, dev, r, alpha, dtype=dtype)
    enable_checkpointing(model)
    model.config.use_cache = False
    stats = speedups.apply(model, chosen, dev)["offload"]
    mask = None
    if dev.type == "meta" and attention == "flash":
        meta_attention.use_on(model)
        # a 2-D mask keeps transformers from reading position ids' values (the
        # packed-sequence check); the implementation's mask function drops it
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=dev)
    elif dev.type == "meta":
        # On meta, transformers' mask builder reads values (is the mask all ones?):
        # a ready 4-D causal mask skips it.
        mask = torch.ones(batch_size, 1, seq_len, seq_len, dtype=torch.bool, device=dev).tril()
    out = {"preset": preset, "device": str(dev), "tokens": batch_size * seq_len,
           "r": r, "options": {"liger": liger, "offload": offload, "fuse": fuse,
                               "attention": attention if dev.type == "meta" else "sdpa"},
           "batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."),
           "largest_layer_bytes": _largest_layer_bytes(model, dtype), "strategies": {}}
    params = [p for p in model.parameters() if p.requires_grad]
    if dev.type == "cuda":
        # One unmeasured step per strategy first: Triton's autotuning (its
        # timing buffers), compilation and cuBLAS' workspace stay out of the peaks.
        for name in strategies_to_run:
            with force_strategy(name):
                _step(model, shape.vocab_size, batch_size, seq_len, mask, paged_adamw(params, lr=2e-4))
    for name in strategies_to_run:
        qt.release_scratch()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        optimizer = paged_adamw(params, lr=2e-4)  # fresh: its states are allocated in the step
        before = strategies.copy()
        meter = memory_meter(dev, [*model.parameters(), *model.buffers()])
        moved = dataclasses.asdict(stats) if stats is not None else None
        with force_strategy(name), meter:
            _step(model, shape.vocab_size, batch_size, seq_len, mask, optimizer, meter)
            result = meter.result()
        if stats is not None:  # this step's share
            now = dataclasses.asdict(stats)
            result["offload"] = {k: now[k] - moved[k] if k != "peak_host_bytes" else now[k] for k in now}
        out["kind"] = result["kind"]
        result["ran"] = {f"{op}/{s}": n for (op, s), n in (strategies - before).items()}
        result["scratch_buffers"] = {str(dtype_).removeprefix("torch."): buf.numel() * buf.element_size()
                                     for (_, dtype_), buf in scratch.scratch_buffers().items()}
        out["strategies"][name] = result
        del optimizer
    qt.release_scratch()
    return out


def format_peaks(result: dict) -> str:
    """A few lines for the console: each strategy's peak and its excess over "fused"."""
    gib = 2**30
    layer = result["largest_layer_bytes"]
    opts = result.get("options", {})
    on = [k for k in ("fuse", "liger", "offload") if opts.get(k)]
    lines = [f"preset {result['preset']}: one LoRA step ({result['batch_size']} x {result['seq_len']} tokens, "
             f"{result['dtype']}, r {result.get('r')}, gradient checkpointing) on {result['device']}, "
             f"{result['kind']}; options: {', '.join(on) or 'none'}; attention accounted as "
             f"{opts.get('attention', '?')}; largest layer in {result['dtype']}: {layer / 2**20:.1f} MiB"]
    fused = result["strategies"].get("fused", {}).get("peak_bytes")
    for name, r in result["strategies"].items():
        phases = ", ".join(f"{p} {v['peak_bytes'] / gib:.3f}" for p, v in r["phases"].items())
        extra = "" if fused is None else (f", {(r['peak_bytes'] - fused) / 2**20:+.1f} MiB vs fused "
                                          f"({(r['peak_bytes'] - fused) / layer:+.2f} largest layers)")
        ran = ", ".join(f"{k} x{n}" for k, n in sorted(r["ran"].items()))
        lines.append(f"  {name:8s} peak {r['peak_bytes'] / gib:.3f} GiB{extra}; phases (GiB): {phases}; ran: {ran}")
        if r.get("peak_breakdown"):
            parts = ", ".join(f"{tag} {v / gib:.3f}" for tag, v in
                              sorted(r["peak_breakdown"].items(), key=lambda kv: -kv[1]))
            lines.append(f"           at the peak (GiB): {parts}")
        if r.get("offload"):
            o = r["offload"]
            lines.append(f"           offloaded to the host: {o['offloaded_tensors']} layer inputs, "
                         f"{o['offloaded_bytes'] / gib:.3f} GiB (at most {o['peak_host_bytes'] / gib:.3f} GiB at once)")
    return "\n".join(lines)


# The issue-23 table: each option's share of the peak, on meta, bf16, r 16, batch 1.
TABLE_CASES = (("7b", 2048), ("33b", 2048), ("65b", 2048), ("65b", 8192), ("70b", 4096))
TABLE_TARGETS_GIB = {("7b", 2048): 4.6, ("33b", 2048): 19, ("65b", 2048): 35, ("65b", 8192): 37,
                     ("70b", 4096): 40}
TABLE_STEPS = (("today (math attention)", {"attention": "math"}),
               ("+ flash-attention accounting", {}),
               ("+ Liger CE (chunked on meta)", {"liger": True}),
               ("+ offload", {"liger": True, "offload": True}),
               ("+ fused blocks", {"liger": True, "offload": True, "fuse": True}))


def memory_table(cases=TABLE_CASES, r: int = 16, out_dir: str | None = None) -> dict:
    """Run every case under each cumulative step of :data:`TABLE_STEPS` ("today"
    skipped at 8192 tokens, where the math path's scores alone are 8 GiB a layer) and write ``memory-table.json`` and
    ``memory-table.md`` to ``out_dir``."""
    import time

    from .presets import lora_params
    from .report import write_json

    rows = []
    for preset, seq in cases:
        row = {"preset": preset, "seq_len": seq, "target_gib": TABLE_TARGETS_GIB.get((preset, seq)),
               "adam_states_bytes": 8 * lora_params(LLAMA_SHAPES[preset], r), "steps": {}}
        for label, kw in TABLE_STEPS:
            if seq > 4096 and kw.get("attention") == "math":
                continue
            result = step_peaks(preset, device="meta", batch_size=1, seq_len=seq, r=r,
                                strategies_to_run=("fused",), **kw)
            s = result["strategies"]["fused"]
            row["steps"][label] = {"peak_bytes": s["peak_bytes"],
                                   "phases": {k: v["peak_bytes"] for k, v in s["phases"].items()},
                                   "peak_breakdown": s["peak_breakdown"], "offload": s.get("offload")}
            print(f"{preset} {seq} {label}: {s['peak_bytes'] / 2**30:.3f} GiB", flush=True)
        rows.append(row)
    table = {"kind": "meta_tensor_accounting (estimate, no GPU)", "dtype": "bfloat16", "r": r, "batch_size": 1,
             "gradient_checkpointing": True, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
             "rows": rows}
    if out_dir:
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "memory-table.json", table)
        tmp = out / "memory-table.md.tmp"
        tmp.write_text(format_table(table))
        tmp.replace(out / "memory-table.md")  # atomic
    return table


def format_table(table: dict) -> str:
    gib = 2**30
    labels = [label for label, _ in TABLE_STEPS]
    lines = ["| model, tokens | " + " | ".join(labels) + " | target | last column, states not evicted |",
             "|---|" + "---|" * (len(labels) + 2)]
    for row in table["rows"]:
        cells, previous, last = [], None, None
        for label in labels:
            step = row["steps"].get(label)
            if step is None:
                cells.append("n/a")
                continue
            last = step
            peak = step["peak_bytes"] / gib
            share = "" if previous is None else f" ({peak - previous:+.2f})"
            cells.append(f"{peak:.2f}{share}")
            previous = peak
        # the measured step allocates the Adam states in its optimizer phase, as a
        # PagedAdamW with evict_after_step does in every step; without eviction they
        # stay on the device through forward and backward as well
        ph = last["phases"]
        kept = max(max(ph["forward"], ph["backward"]) + row["adam_states_bytes"], ph["optimizer"])
        lines.append(f"| {row['preset']}, {row['seq_len']} | " + " | ".join(cells)
                     + f" | <= {row['target_gib']} | {kept / gib:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    memory_table(out_dir=sys.argv[1] if len(sys.argv) > 1 else None)
