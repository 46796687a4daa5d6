"""Decode, end to end: ``model.generate`` on a Llama-shaped model, tokens per second.

One greedy ``generate`` per (provider, mode) on the same random Llama (LLaMA-7B
layer shapes by default, ``--layers`` of them: decode time per layer is the same
in a shorter stack, and the compile stays short), with a static KV cache
(``cache_implementation="static"``):

* providers: ``qlora_triton`` (every decoder linear a ``qt.Linear4bit``, NF4,
  blocksize 64, double quant), ``bitsandbytes`` (``bnb.nn.Linear4bit``, the
  same format), ``bf16`` (the dense model);
* modes: ``eager`` (the static cache, no compile) and ``compiled``
  (transformers' own compile of a static-cache ``generate``, through its
  ``CompileConfig``: the decode step under ``torch.compile(mode=
  "reduce-overhead")``, on CUDA CUDA graphs captured once and replayed for
  every token; the prefill stays eager). Compiling ``model.forward`` by hand
  failed on the H200 with transformers 5.17 (CUDA-graph trees found outputs of
  an earlier replay still in use: benchmarks/results/h200-2026-12-04).

Each row says whether the compiled run gave the eager run's tokens, the decode
time per token (``(t(N tokens) - t(1 token)) / (N - 1)``, so the prefill is left
out; median of ``--reps``), tokens/s, and the floor: the bytes one decode step
must read (the NF4 or bf16 linears, the bf16 embedding row and LM head) over
4.3 TB/s, the H200's measured copy rate (an estimate, not a measurement).
Rows are appended to ``--out`` (JSON lines) as they are measured; the GPU check
runs ``--modes eager`` for every provider first, then ``--modes compiled`` (the
compiles take longest), so a time limit cuts the compiled rows first.

On the CPU (``--smoke``): a tiny random Llama, a few tokens, fp32. There are no
CUDA graphs there; the honest analogue is ``torch.compile`` capturing the decode
step once (backend ``aot_eager`` by default: the captured graph, without
codegen) and running that graph for every token. The smoke mode checks that the
compiled decode gives exactly the eager tokens and that the decode step was
captured once, not once per token. tests/test_bench_decode.py runs it.

    python -m benchmarks.bench_decode --out decode.jsonl          # CUDA
    python -m benchmarks.bench_decode --smoke                      # CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROVIDERS = ("qlora_triton", "bf16", "bitsandbytes")
MODES = ("eager", "compiled")
H200_COPY_GBPS = 4300.0  # GPU.md: measured device-to-device copy, bytes read + written


def build_model(preset: str, layers: int | None, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random ``LlamaForCausalLM`` of the preset's shapes (``layers`` of them)."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from qlora_triton.finetune.model import llama_config
    from qlora_triton.finetune.presets import LLAMA_SHAPES

    shape = LLAMA_SHAPES[preset]
    if layers is not None:
        shape = replace(shape, num_hidden_layers=layers)
    config = llama_config(shape)
    config.use_cache = True
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _decoder_linears(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    return [(parent, name, child) for parent in model.model.layers.modules()
            for name, child in parent.named_children() if isinstance(child, torch.nn.Linear)]


def quantize_model(model, provider: str) -> None:
    """Swap every decoder linear (attention and MLP; not the LM head) for the
    provider's NF4 layer, in place; ``bf16`` leaves the model dense."""
    if provider == "bf16":
        return
    for parent, name, linear in _decoder_linears(model):
        if provider == "qlora_triton":
            import qlora_triton as qt

            layer = qt.Linear4bit.from_linear(linear, blocksize=64, double_quant=True)
        elif provider == "bitsandbytes":
            import bitsandbytes as bnb

            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, compress_statistics=True,
                                      quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             blocksize=64, compress_statistics=True)
            layer = layer.to(linear.weight.device)  # Params4bit quantizes on the move
        else:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        setattr(parent, name, layer)


def step_bytes(model, provider: str) -> int:
    """Bytes one decode step must read: the decoder linears (NF4 with scales, or
    bf16), the LM head and one embedding row (the KV cache, a few MB here, is left out)."""
    from .cases import nf4_bytes

    linear = sum(nf4_bytes(m.out_features, m.in_features) if provider != "bf16" else
                 m.weight.numel() * m.weight.element_size() for _, _, m in _decoder_linears_any(model))
    head = model.lm_head.weight
    return linear + head.numel() * head.element_size() + model.config.hidden_size * head.element_size()


def _decoder_linears_any(model):
    for parent in model.model.layers.modules():
        for name, child in parent.named_children():
            if hasattr(child, "in_features") and hasattr(child, "out_features"):
                yield parent, name, child


def compile_config(backend: str, mode: str | None, device: torch.device):
    """transformers' own ``CompileConfig`` for ``generate``: it compiles the decode
    step alone (not the prefill) and marks each CUDA-graph step. Off CUDA,
    transformers compiles only when told to (``_compile_all_devices``, its own
    switch for this)."""
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=mode)
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def generate(model, prompt: torch.Tensor, new_tokens: int, compiled=None) -> torch.Tensor:
    """Greedy decode of exactly ``new_tokens`` tokens with a static cache;
    ``compiled``: a :func:`compile_config` (the decode step compiled by
    transformers' generate), None: eager."""
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_implementation="static", disable_compile=compiled is None,
                         compile_config=compiled, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(model, provider: str, prompt: torch.Tensor, new_tokens: int, reps: int, backend: str,
            compile_mode: str | None, modes=MODES):
    """Yield one row per mode; the compiled row is checked against the eager tokens."""
    import torch._dynamo

    device = prompt.device
    eager_tokens = generate(model, prompt, new_tokens) if "compiled" in modes else None
    for mode in modes:
        row = {"bench": "decode", "provider": provider, "mode": mode, "device": device.type,
               "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
               "prompt": prompt.shape[1], "new_tokens": new_tokens}
        try:
            torch._dynamo.reset()
            config = compile_config(backend, compile_mode, device) if mode == "compiled" else None
            run = functools.partial(generate, model, prompt, compiled=config)
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            t_first = _timed(lambda: run(new_tokens), device)  # compiles, warms up
            tokens = run(new_tokens)
            row["graphs_captured"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
            if mode == "compiled":
                row["tokens_match_eager"] = bool(torch.equal(tokens, eager_tokens))
                row["tokens_equal_fraction"] = float((tokens == eager_tokens).float().mean())
            long = [_timed(lambda: run(new_tokens), device) for _ in range(reps)]
            short = [_timed(lambda: run(1), device) for _ in range(reps)]
            per_token = (statistics.median(long) - statistics.median(short)) / max(new_tokens - 1, 1)
            row.update(status="ok", first_call_s=round(t_first, 3), ms_per_token=per_token * 1e3,
                       tokens_per_s=1.0 / per_token if per_token > 0 else None,
                       generate_s=statistics.median(long), tokens=tokens[0].tolist())
        except Exception as err:  # noqa: BLE001 - a failing provider or mode is a row, not a stop
            row.update(status=f"error: {type(err).__name__}: {str(err)[:300]}")
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU, fp32, a few tokens")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--preset", default=None, help="Llama shapes (qlora_triton.finetune.presets; default 7b, "
                        "tiny with --smoke)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; the preset's with --smoke)")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32, 5 with --smoke)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64, 6 with --smoke)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median; default 3, 1 with --smoke)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager "
                        "with --smoke)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", help="append one JSON line per row to this file as it is measured")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    smoke = args.smoke
    preset = args.preset or ("tiny" if smoke else "7b")
    layers = args.layers if args.layers is not None else (None if smoke else 4)
    providers = tuple((args.providers or ("qlora_triton,bf16" if smoke else ",".join(PROVIDERS))).split(","))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        parser.error(f"--providers must be among {','.join(PROVIDERS)}, got {','.join(bad)}")
    modes = tuple(args.modes.split(","))
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be among {','.join(MODES)}, got {args.modes}")
    prompt_len = args.prompt or (5 if smoke else 32)
    new_tokens = args.new_tokens or (6 if smoke else 64)
    if new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode time is t(N) - t(1))")
    reps = args.reps or (1 if smoke else 3)
    backend = args.backend or ("aot_eager" if device.type == "cpu" else "inductor")
    compile_mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = Path(args.out) if args.out else None
    rows = []
    import qlora_triton as qt

    # On the CPU the plain-torch reference runs the NF4 layers (the interpreter
    # would time Python); the Triton kernels run on CUDA.
    backend_ctx = qt.force_backend("torch") if device.type == "cpu" else qt.force_backend("triton")
    with torch.no_grad(), backend_ctx:
        for provider in providers:
            try:
                model = build_model(preset, layers, device, dtype)
                quantize_model(model, provider)
            except Exception as err:  # noqa: BLE001 - e.g. bitsandbytes not installed
                results = [{"bench": "decode", "provider": provider, "status": f"error: {type(err).__name__}: {err}"}]
            else:
                nbytes = step_bytes(model, provider)
                torch.manual_seed(1)
                prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), device=device)
                results = measure(model, provider, prompt, new_tokens, reps, backend, compile_mode, modes)
            for row in results:
                if "step_bytes" not in row and row.get("status") == "ok":
                    row["step_bytes"] = nbytes
                    row["floor_ms_per_token_estimate"] = nbytes / (H200_COPY_GBPS * 1e9) * 1e3
                row.update(preset=preset, dtype=str(dtype).removeprefix("torch."), backend=backend,
                           compile_mode=compile_mode)
                rows.append(row)
                if out is not None:
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                print(_line(row), flush=True)
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    failed = [r for r in rows if r.get("status") != "ok" or r.get("tokens_match_eager") is False]
    if smoke and failed:
        print(f"bench_decode --smoke: {len(failed)} row(s) failed or differ from eager", file=sys.stderr)
        return 1
    return 0


def _line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"decode {row['provider']:13s} {row.get('mode', '-'):9s} {row['status']}"
    match = row.get("tokens_match_eager")
    return (f"decode {row['provider']:13s} {row['mode']:9s} {row['tokens_per_s']:9.1f} tok/s "
            f"{row['ms_per_token']:8.3f} ms/token (floor est. {row['floor_ms_per_token_estimate']:.3f}) "
            f"graphs {row['graphs_captured']}" + ("" if match is None else f" tokens==eager {match}"))


if __name__ == "__main__":
    sys.exit(main())
