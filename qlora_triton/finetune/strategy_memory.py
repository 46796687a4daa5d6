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

On the meta device attention takes torch's math path (the [B, H, S, S]
scores are materialized), so the absolute peak is above a flash-attention
GPU run's; the strategies' differences are exact either way.
"""

from __future__ import annotations

import gc

import torch

from ..ops import scratch
from ..strategy import STRATEGIES, force_strategy, strategies
from ..tensor_memory import memory_meter
from .optimizer import paged_adamw
from .presets import LLAMA_SHAPES, build_quantized_llama


def _largest_layer_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    from ..linear import Linear4bit

    numel = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return numel * torch.empty((), dtype=dtype).element_size()


def _step(model, vocab_size: int, batch_size: int, seq_len: int, mask, optimizer, meter=None) -> None:
    """Forward, backward and optimizer step on random tokens, each a phase of ``meter``."""
    import contextlib

    phase = meter.phase if meter is not None else (lambda name: contextlib.nullcontext())
    device = next(model.parameters()).device
    with phase("forward"):
        batch = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
        loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
    with phase("backward"):
        loss.backward()
        del loss, batch
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def step_peaks(preset: str = "7b", device: str | torch.device | None = None, batch_size: int = 1,
               seq_len: int = 512, r: int = 8, alpha: float = 16.0,
               strategies_to_run: tuple = STRATEGIES, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{"device", "kind", "tokens", "largest_layer_bytes", "strategies": {name: {"peak_bytes",
    "baseline_bytes", "phases", "ran", "scratch_buffers"}}}`` for one LoRA step of ``preset``
    under each strategy (device default: CUDA if available, else meta)."""
    import qlora_triton as qt

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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # On meta, transformers' mask builder reads values (is the mask all ones?):
    # a ready 4-D causal mask skips it.
    mask = (torch.ones(batch_size, 1, seq_len, seq_len, dtype=torch.bool, device=dev).tril()
            if dev.type == "meta" else None)
    out = {"preset": preset, "device": str(dev), "tokens": batch_size * seq_len,
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
        with force_strategy(name), meter:
            _step(model, shape.vocab_size, batch_size, seq_len, mask, optimizer, meter)
            result = meter.result()
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
    lines = [f"preset {result['preset']}: one LoRA step ({result['batch_size']} x {result['seq_len']} tokens, "
             f"{result['dtype']}) on {result['device']}, {result['kind']}; largest layer in "
             f"{result['dtype']}: {layer / 2**20:.1f} MiB"]
    fused = result["strategies"].get("fused", {}).get("peak_bytes")
    for name, r in result["strategies"].items():
        phases = ", ".join(f"{p} {v['peak_bytes'] / gib:.3f}" for p, v in r["phases"].items())
        extra = "" if fused is None else (f", {(r['peak_bytes'] - fused) / 2**20:+.1f} MiB vs fused "
                                          f"({(r['peak_bytes'] - fused) / layer:+.2f} largest layers)")
        ran = ", ".join(f"{k} x{n}" for k, n in sorted(r["ran"].items()))
        lines.append(f"  {name:8s} peak {r['peak_bytes'] / gib:.3f} GiB{extra}; phases (GiB): {phases}; ran: {ran}")
    return "\n".join(lines)
