"""Sizes: the default run's per-device size, and the LLaMA-shaped ``--preset`` runs.

``--preset NAME`` builds a ``LlamaForCausalLM`` with LLaMA-1's shapes and
random weights, quantized layer by layer straight to NF4 (double quant): the
model skeleton is made on the meta device (no storage), then each linear
layer gets a dense random weight on the target device, is turned into a
``qt.LoRALinear4bit`` and the dense weight is dropped before the next one is
made. The dense model never exists, so the peak while building is the NF4
model plus one dense layer. A few LoRA training steps on random tokens then
measure step time and peak memory at that scale.

With ``lora16=True`` the run then times the baseline the QLoRA paper measures
against, 16-bit LoRA, on the same shape: the same LLaMA with dense bf16 random
weights and PEFT's ``LoraConfig`` on the same seven projections (fp32
adapters, PEFT's default), the same r, alpha, gradient checkpointing, tokens
and number of steps, Liger-Kernel when the QLoRA run has it (it patches PEFT
models as well; the fused blocks are ours and stay out), ``torch.optim.AdamW``.
PEFT rather than our LoRA layer on a dense weight, so that the baseline does
not share the code under test (as in the fine-tune's ``lora16`` phase).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..training import enable_checkpointing
from .memory import PeakMemory, available_bytes, sync
from .model import LLAMA_LINEARS, ModelShape, llama_config
from .optimizer import paged_adamw
from .report import write_json
from .step import timed_step

# The default run (no --preset), by device: model size, data and steps chosen
# so that fine-tuning clearly lowers the task-2 loss and, on the CPU, the run
# stays under 3 minutes on 2 cores (issue 23). The CPU's step time grows with
# the tokens (a 16 x 64 step took about 0.7 of a 16 x 96 one), so the CPU run
# trains on 16 x 64-token windows, 250 pre-training and 100 fine-tuning steps
# (until 2026-12-04: 400 and 120 steps of 16 x 96, the same model; docs/demo.md).
DEFAULT_SIZES = {
    "cpu": {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 3,
            "steps": 100, "pretrain_steps": 250, "batch_size": 16, "seq_len": 64, "eval_every": 20,
            "eval_windows": 48, "task1_sentences": 20000, "task2_sentences": 8000},
    "cuda": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_hidden_layers": 8,
             "steps": 300, "pretrain_steps": 1500, "batch_size": 32, "seq_len": 256, "eval_every": 25,
             "eval_windows": 256, "task1_sentences": 200000, "task2_sentences": 50000},
}


def bundled_shape(size: dict, vocab_size: int, seq_len: int) -> ModelShape:
    return ModelShape(hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
                      num_attention_heads=size["num_attention_heads"],
                      num_hidden_layers=size["num_hidden_layers"], vocab_size=vocab_size,
                      max_position_embeddings=max(seq_len, 128))


# LLaMA-1 shapes (Touvron et al. 2023, table 2; intermediate sizes of the released checkpoints),
# and LLaMA-2 70B (grouped-query attention: 8 key/value heads).
LLAMA_SHAPES = {
    "tiny": ModelShape(128, 344, 4, 2, 1024, 2048),
    "7b": ModelShape(4096, 11008, 32, 32, 32000, 2048),
    "13b": ModelShape(5120, 13824, 40, 40, 32000, 2048),
    "33b": ModelShape(6656, 17920, 52, 60, 32000, 2048),
    "65b": ModelShape(8192, 22016, 64, 80, 32000, 2048),
    "70b": ModelShape(8192, 28672, 64, 80, 32000, 4096, num_key_value_heads=8),
}


def linear_params(shape: ModelShape) -> int:
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    return shape.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * i)


def lora_params(shape: ModelShape, r: int) -> int:
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    per_layer = 2 * r * (h + h) + 2 * r * (h + kv) + 2 * r * (h + i) + r * (i + h)
    return shape.num_hidden_layers * per_layer


def estimate_bytes(shape: ModelShape, r: int, batch_size: int, seq_len: int, world_size: int = 1) -> dict:
    """What one rank will hold at its peak, roughly (bytes), with ``batch_size``
    sequences per rank.

    NF4 with double quant is 4.127 bits per weight; embeddings and head stay
    bf16; LoRA params, grads and Adam moments fp32; activations with
    gradient checkpointing: one bf16 hidden state per layer plus one layer's
    full set of activations and the fp32 logits. With ``world_size`` > 1
    (FSDP2, ``qlora_triton.distributed``) the NF4 base, the LoRA state and
    the embeddings are sharded, and a rank also holds the gathered NF4 of two
    decoder layers (the one running and the one prefetched) and, for the
    whole step, the root's gathered embeddings and head."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    h, i, v, n_layers = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    tokens = batch_size * seq_len
    nf4 = linear_params(shape) * 4.127 / 8
    embed_and_head = 2 * v * h * 2
    parts = {
        "nf4_weights": nf4 / world_size,
        "embed_and_head": embed_and_head,
        "lora_and_adam": lora_params(shape, r) * (4 + 4 + 8) / world_size,  # fp32 weights, grads, 2 moments
        "one_dense_layer": i * h * 2 * 2,  # the dense weight being quantized, plus its copy in flight
        "activations": tokens * (n_layers * h * 2 + (10 * h + 4 * i) * 2 + v * 4 * 3),
    }
    if world_size > 1:
        parts["gathered_layers"] = 2 * nf4 / n_layers
    parts["total"] = sum(parts.values())
    return {k: int(val) for k, val in parts.items()}


def ranks_needed(shape: ModelShape, rank_bytes: int, r: int = 8, batch_size: int = 1,
                 seq_len: int = 512, max_ranks: int = 64) -> int | None:
    """The fewest FSDP2 ranks of ``rank_bytes`` each that ``shape`` fits on
    (:func:`estimate_bytes` per rank), or None if more than ``max_ranks``."""
    for world in range(1, max_ranks + 1):
        if estimate_bytes(shape, r, batch_size, seq_len, world)["total"] <= rank_bytes:
            return world
    return None


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give the parameters still on the meta device (embeddings, norms, head) real storage."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type != "meta" or not param.is_floating_point():
                continue  # (integer ones: the NF4 storage of a model built on meta stays there)
            real = torch.empty(param.shape, device=device, dtype=dtype)
            if name == "weight" and param.dim() == 1:
                real.fill_(1.0)  # RMSNorm gains
            else:
                real.normal_(0.0, 0.02)
            setattr(sub, name, torch.nn.Parameter(real, requires_grad=False))


def _finish_llama(model, config, device: torch.device, dtype: torch.dtype) -> None:
    """Real storage for what a model built on the meta device still lacks
    (:func:`_materialize`), and its rotary buffers, which were computed on meta:
    computed again (the device as a context: the constructor's signature
    differs across transformers versions)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    _materialize(model, device, dtype)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)


def build_quantized_llama(shape: ModelShape, device: torch.device, r: int, alpha: float,
                          dtype: torch.dtype = torch.bfloat16, progress=None):
    """A LLaMA model of ``shape`` with NF4 + LoRA linears, built layer by layer
    (on the meta device: every tensor without storage, for tensor accounting)."""
    import qlora_triton as qt
    from ..convert import freeze_all_but_lora
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    config = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_LINEARS]
    for name, meta_linear in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        if device.type == "meta":  # tensor accounting: no values, only quantize_nf4's layout
            qw = qt.NF4Weight.empty((meta_linear.out_features, meta_linear.in_features), dtype)
            lora = qt.LoRALinear4bit(qw, r=r, lora_alpha=alpha, lora_dropout=0.0)
        else:
            dense = torch.nn.Linear(meta_linear.in_features, meta_linear.out_features, bias=False,
                                    device=device, dtype=dtype)
            with torch.no_grad():
                dense.weight.normal_(0.0, 0.02)
            lora = qt.LoRALinear4bit.from_linear(dense, r=r, lora_alpha=alpha, lora_dropout=0.0)
            del dense
        setattr(parent, name.rsplit(".", 1)[-1], lora)
        del lora
        if progress is not None:
            progress.update(1)
    _finish_llama(model, config, device, dtype)
    freeze_all_but_lora(model)
    return model


def build_lora16_llama(shape: ModelShape, device: torch.device, r: int, alpha: float,
                       dtype: torch.dtype = torch.bfloat16):
    """The 16-bit LoRA baseline of ``shape``: dense ``dtype`` random weights (made
    on the device, as :func:`build_quantized_llama` makes its layers) and PEFT's
    LoRA on :data:`LLAMA_LINEARS`, gradient checkpointing on."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    _finish_llama(model, config, device, dtype)
    enable_checkpointing(model)
    model.config.use_cache = False
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LLAMA_LINEARS),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def prepare_qlora(model, chosen, dev: torch.device, lr: float) -> tuple[dict, list, torch.optim.Optimizer]:
    """The QLoRA side of a preset step, on a built model: checkpointing, the
    speedups ``chosen`` (:func:`.speedups.apply`; what ran is returned) and
    ``PagedAdamW``, which with offload evicts its states after each step too.
    Returns ``(what ran, trainable params, optimizer)``."""
    from . import speedups

    enable_checkpointing(model)
    model.config.use_cache = False
    ran = speedups.apply(model, chosen, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    return ran, params, paged_adamw(params, lr=lr, evict_after_step=chosen.offload)


def prepare_lora16(model, liger: bool, dev: torch.device,
                   lr: float) -> tuple[str | None, list, torch.optim.Optimizer]:
    """The 16-bit LoRA side, on :func:`build_lora16_llama`'s model: Liger when
    the QLoRA side has it, ``torch.optim.AdamW``. Returns ``(Liger's path or
    None, trainable params, optimizer)``."""
    from ..liger import apply_liger

    path = apply_liger(model, dev) if liger else None
    params = [p for p in model.parameters() if p.requires_grad]
    return path, params, torch.optim.AdamW(params, lr=lr)


def lora16_bytes(shape: ModelShape, r: int, batch_size: int, seq_len: int) -> int:
    """:func:`estimate_bytes` with the linear weights dense bf16 instead of NF4
    (and no layer being quantized): what the 16-bit LoRA baseline needs."""
    est = estimate_bytes(shape, r, batch_size, seq_len)
    return est["total"] - est["nf4_weights"] - est["one_dense_layer"] + linear_params(shape) * 2


def _train_steps(model, optimizer, shape: ModelShape, steps: int, batch_size: int, seq_len: int,
                 dev: torch.device, seed: int, desc: str, quiet: bool) -> tuple[list[float], list[float]]:
    """``steps`` timed training steps on random tokens (the same tokens for a
    given ``seed``); returns the seconds and the losses of each."""
    from tqdm.auto import tqdm

    tokens = torch.Generator(device=dev).manual_seed(seed)
    seconds, losses = [], []
    for _ in tqdm(range(steps), desc=desc, disable=quiet):
        batch = torch.randint(0, shape.vocab_size, (batch_size, seq_len), device=dev, generator=tokens)
        loss, took = timed_step(model, batch, optimizer, dev)
        seconds.append(took)
        losses.append(loss.item())
    return seconds, losses


def _human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# On the CPU (the plain-torch reference), a preset that would take longer is refused.
CPU_SECONDS_LIMIT = 180
# Rough CPU rates, measured on 2 cores (2026-12-01): random init + NF4 quantization
# of weights, and bf16 training matmuls.
CPU_WEIGHTS_PER_S = 2e7
CPU_FLOPS = 2e10


def estimate_cpu_seconds(shape: ModelShape, batch_size: int, seq_len: int, steps: int) -> float:
    """Build (init + quantize every linear weight) plus ``steps`` training steps
    (about 6 flops per weight and token: forward, grad-input, LoRA)."""
    weights = linear_params(shape)
    return weights / CPU_WEIGHTS_PER_S + steps * 6 * weights * batch_size * seq_len / CPU_FLOPS


def run_preset(name: str, device: str | None = None, steps: int = 4, batch_size: int | None = None,
               seq_len: int | None = None, r: int = 8, alpha: float = 16.0, lr: float = 2e-4,
               seed: int = 0, output_dir: str | None = None, quiet: bool = False,
               fuse: bool | None = None, liger: bool | None = None, offload: bool | None = None,
               lora16: bool = False) -> dict:
    """Build the preset's NF4 LLaMA and time ``steps`` LoRA steps (the first is warm-up);
    ``fuse``/``liger``/``offload``: see :mod:`.speedups` (None: the default). With
    ``lora16``, then time 16-bit LoRA on the same shape (module docstring): the
    result's ``"lora16"`` entry, and ``"vs_lora16"`` (QLoRA's step time and peak
    memory over the baseline's)."""
    import contextlib

    import qlora_triton as qt
    from tqdm.auto import tqdm

    if name not in LLAMA_SHAPES:
        raise ValueError(f"preset: expected one of {sorted(LLAMA_SHAPES)}, got {name!r}")
    if steps < 2:
        raise ValueError(f"steps: a preset run needs at least 2 (one warm-up), got {steps}")
    from . import speedups

    chosen = speedups.resolve(fuse, liger, offload)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = LLAMA_SHAPES[name]
    batch_size = batch_size or (1 if dev.type == "cuda" else 2)
    seq_len = seq_len or (512 if dev.type == "cuda" else 64)
    estimate = estimate_bytes(shape, r, batch_size, seq_len)
    free = available_bytes(dev)
    if estimate["total"] > free:
        raise MemoryError(
            f"preset {name}: needs about {estimate['total'] / 2**30:.1f} GiB on {dev} "
            f"(NF4 weights {estimate['nf4_weights'] / 2**30:.1f} GiB), but only {free / 2**30:.1f} GiB "
            f"is available; use a smaller preset, or a GPU with more memory")
    if dev.type == "cpu":
        seconds = estimate_cpu_seconds(shape, batch_size, seq_len, steps)
        if seconds > CPU_SECONDS_LIMIT:
            raise ValueError(f"preset {name}: about {seconds / 60:.0f} minutes on the CPU (building and "
                             f"quantizing {linear_params(shape) / 1e9:.1f}B weights, then {steps} steps); "
                             f"it runs only when under {CPU_SECONDS_LIMIT // 60} minutes: use --preset tiny "
                             "on the CPU, or a GPU")

    torch.manual_seed(seed)
    memory = PeakMemory(dev)
    memory.start()
    # The CPU runs the plain-torch reference even under TRITON_INTERPRET=1 (see train.pick_backend).
    backend = qt.force_backend("torch") if dev.type == "cpu" else contextlib.nullcontext()
    with backend:
        n_linear = shape.num_hidden_layers * len(LLAMA_LINEARS)
        t0 = time.perf_counter()
        with tqdm(total=n_linear, desc=f"build {name} in NF4", disable=quiet) as bar:
            model = build_quantized_llama(shape, dev, r, alpha, progress=bar)
        sync(dev)
        build_seconds = time.perf_counter() - t0
        built = memory.result()
        ran, params, optimizer = prepare_qlora(model, chosen, dev, lr)
        step_seconds, losses = _train_steps(model, optimizer, shape, steps, batch_size, seq_len, dev,
                                            seed, f"{name}: LoRA steps", quiet)
    timed = step_seconds[1:]
    from .model import tensor_bytes

    result = {
        "preset": name, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": asdict(shape),
        "linear_params": linear_params(shape), "lora_params": sum(p.numel() for p in params),
        "weight_bytes": tensor_bytes(model), "batch_size": batch_size, "seq_len": seq_len,
        "steps": steps, "build_seconds": build_seconds,
        "step_seconds": step_seconds, "step_seconds_median": statistics.median(timed),
        "tokens_per_s": batch_size * seq_len / statistics.median(timed),
        "losses": losses, "memory_after_build": built, "memory": memory.result(),
        "estimate_bytes": estimate, "speedups": [name for name in ("fuse", "liger", "offload") if ran[name]],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # Written and printed before the baseline starts, so that a run cut short there keeps them.
    path = Path(output_dir) / f"preset-{name}.json" if output_dir else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    if not quiet:
        mem = result["memory"]
        print(f"preset {name} on {result['device_name']}: {result['linear_params'] / 1e6:,.1f} M linear params, "
              f"weights {_human(result['weight_bytes'])}, build {build_seconds:.1f} s, "
              f"step {result['step_seconds_median'] * 1e3:.1f} ms (batch {batch_size} x {seq_len}), "
              f"peak {mem['kind']} {_human(mem['peak_bytes'])}"
              + (f" (wrote {path})" if path is not None else ""), flush=True)
    if lora16:
        del model, optimizer, params
        result["lora16"] = _run_lora16(shape, dev, r, alpha, lr, seed, steps, batch_size, seq_len, chosen.liger,
                                       quiet)
        result["vs_lora16"] = _versus(result, result["lora16"])
        if path is not None:
            write_json(path, result)
        if not quiet:
            print(_lora16_line(result))
    if path is not None:
        result["json"] = str(path)
    return result


def _run_lora16(shape: ModelShape, dev: torch.device, r: int, alpha: float, lr: float, seed: int,
                steps: int, batch_size: int, seq_len: int, liger: bool, quiet: bool) -> dict:
    """The 16-bit LoRA baseline (module docstring), or why it was skipped."""
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    need, free = lora16_bytes(shape, r, batch_size, seq_len), available_bytes(dev)
    if need > free:
        return {"skipped": f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"}
    torch.manual_seed(seed)
    memory = PeakMemory(dev)
    memory.start()
    t0 = time.perf_counter()
    model = build_lora16_llama(shape, dev, r, alpha)
    liger_path, params, optimizer = prepare_lora16(model, liger, dev, lr)
    sync(dev)
    build_seconds = time.perf_counter() - t0
    step_seconds, losses = _train_steps(model, optimizer, shape, steps, batch_size, seq_len, dev, seed,
                                        "16-bit LoRA steps", quiet)
    median = statistics.median(step_seconds[1:])
    return {"method": "PEFT LoRA on dense bf16 weights, torch AdamW, gradient checkpointing",
            "liger": liger_path,
            "lora_params": sum(p.numel() for p in params), "build_seconds": build_seconds,
            "step_seconds": step_seconds, "step_seconds_median": median,
            "tokens_per_s": batch_size * seq_len / median, "losses": losses, "memory": memory.result(),
            "estimate_bytes": lora16_bytes(shape, r, batch_size, seq_len)}


def _versus(qlora: dict, lora16: dict) -> dict:
    """QLoRA over 16-bit LoRA: step time, and (on CUDA) peak memory above each
    run's start. The CPU's figure is the process's peak RSS, which the QLoRA run
    set before the baseline began, so it has no baseline figure of its own."""
    if "skipped" in lora16:
        return {}
    mem = qlora["memory"]["kind"] == "cuda_max_memory_allocated"
    return {"step_time": qlora["step_seconds_median"] / lora16["step_seconds_median"],
            "peak_memory": (qlora["memory"]["delta_bytes"] / lora16["memory"]["delta_bytes"]) if mem else None}


def _lora16_line(result: dict) -> str:
    base = result["lora16"]
    if "skipped" in base:
        return f"16-bit LoRA baseline skipped: {base['skipped']}"
    vs = result["vs_lora16"]
    memory = (f", peak {_human(base['memory']['delta_bytes'])}: QLoRA uses {vs['peak_memory']:.2f}x"
              if vs["peak_memory"] is not None else "")
    return (f"16-bit LoRA (PEFT, bf16 weights): step {base['step_seconds_median'] * 1e3:.1f} ms: QLoRA "
            f"takes {vs['step_time']:.2f}x its time{memory}")
