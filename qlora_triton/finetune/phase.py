"""One fine-tuning phase, run as its own process: ``python -m qlora_triton.finetune.phase SPEC OUT``.

A fresh process per phase makes each phase's peak memory its own (see
``memory.py``). Both phases load the same pre-trained weights in bf16, put
LoRA with the same r, alpha, dropout and targets on the same linear layers,
start from the same adapter weights, and read the same batches in the same
order; they differ only in what the problem is about:

* ``lora16``: the dense bf16 model with PEFT's ``LoraConfig`` /
  ``get_peft_model`` and ``torch.optim.AdamW``. PEFT rather than our own LoRA
  layer on a dense base because the baseline should be independent of the code
  under test: if our LoRA math were wrong, a baseline built from it would be
  wrong the same way and the comparison would still look fine.
* ``qlora``: ``qt.replace_linear`` (NF4 with double quantization, LoRA on
  top) and ``qt.PagedAdamW``.

The 16-bit phase runs first and writes its freshly initialised adapter in
PEFT's format; the QLoRA phase loads it with ``qt.load_adapter``, so both start
from the same A (and B = 0). Adapters are fp32 in both (PEFT's default
``autocast_adapter_dtype=True`` and ``LoRALinear4bit``'s ``lora_dtype``), the
base compute bf16 in both. On a CPU without native bf16, both phases run
inside ``bf16_matmul.Bf16MatmulInFp32`` (``config["bf16_matmul"] == "fp32"``):
their bf16 matmuls and attention take bf16 operands, compute in fp32 and
round the result to bf16, as a bf16 GEMM with fp32 accumulation does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from ..training import enable_checkpointing
from .bf16_matmul import Bf16MatmulInFp32
from .memory import PeakMemory
from .optimizer import paged_adamw


def _optimizer_settings(config: dict) -> dict:
    # One place for both phases: only the implementation differs.
    return {"lr": config["lr"], "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def build_lora16(model, config: dict, targets: list[str], init_adapter: str):
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=config["r"], lora_alpha=config["alpha"], lora_dropout=config["dropout"],
                             target_modules=targets, bias="none", task_type="CAUSAL_LM", use_rslora=False)
    model = get_peft_model(model, lora_config)
    model.save_pretrained(init_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, **_optimizer_settings(config))


def build_qlora(model, config: dict, targets: list[str], init_adapter: str):
    import qlora_triton as qt

    qt.replace_linear(model, target_modules=targets, r=config["r"], lora_alpha=config["alpha"],
                      lora_dropout=config["dropout"], double_quant=True, progress=not config["quiet"])
    qt.load_adapter(model, init_adapter)
    apply_speedups(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    # with offload the Adam states leave the device after each step too
    return model, paged_adamw(params, evict_after_step=bool(config.get("offload")), **_optimizer_settings(config))


def apply_speedups(model, config: dict) -> None:
    """The QLoRA phase's fused blocks, Liger and offload, as ``FinetuneConfig.resolve``
    settled them (the 16-bit baseline stays plain PEFT: see the module docstring)."""
    from .speedups import Speedups, apply

    chosen = Speedups(fuse=config.get("fuse"), liger=bool(config.get("liger")),
                      offload=bool(config.get("offload")))
    if chosen.offload:  # offload works on checkpointed layer inputs
        enable_checkpointing(model)
    apply(model, chosen)


def preload(method: str) -> None:
    """Import what the phase loads lazily, before its memory baseline is taken
    (so that 'delta' is the model's and the training's, not the libraries'),
    and, in a process started early (``--wait``), while the parent pre-trains."""
    from . import data, model, train  # noqa: F401
    import qlora_triton as qt
    import transformers.models.llama.modeling_llama  # noqa: F401

    qt.nf4_codebook()
    if method == "lora16":
        import peft  # noqa: F401


def run_phase(spec: dict) -> dict:
    from . import data as data_mod
    from .model import load_model, lora_targets, tensor_bytes
    from .train import train_loop
    import qlora_triton as qt

    config, method = spec["config"], spec["method"]
    device = torch.device(config["device"])
    preload(method)
    memory = PeakMemory(device)
    memory.start()

    torch.manual_seed(config["seed"] + 5)
    blob = torch.load(spec["data_path"])
    train = data_mod.TokenStream(blob["train"], blob.get("separator"))  # packed per sentence
    held_out = data_mod.TokenStream(blob["eval"])
    model = load_model(spec["model_dir"], torch.bfloat16, device)
    targets = lora_targets(model)
    backend = qt.force_backend(spec["backend"]) if spec["backend"] else contextlib.nullcontext()
    # both phases alike: bf16 CPU matmuls in fp32 where the CPU has no native bf16 (bf16_matmul.py)
    widen = Bf16MatmulInFp32() if config.get("bf16_matmul") == "fp32" else contextlib.nullcontext()
    with backend, widen:
        build = build_lora16 if method == "lora16" else build_qlora
        model, optimizer = build(model, config, targets, spec["init_adapter"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        weight_bytes = tensor_bytes(model)
        title = "16-bit LoRA (bf16, PEFT)" if method == "lora16" else "QLoRA (NF4 + DQ, qt)"
        result = train_loop(model, optimizer, train, blob["starts"], config["seq_len"], device,
                            held_out.eval_batches(config["seq_len"], config["batch_size"],
                                                  config["size"]["eval_windows"]),
                            eval_every=config["eval_every"], desc=title, quiet=config["quiet"])
        if method == "qlora" and config.get("save_adapter"):
            qt.save_adapter(model, config["save_adapter"])
    result.update(method=method, title=title, targets=targets, trainable_params=trainable,
                  weight_bytes=weight_bytes, memory=memory.result(),
                  bf16_matmul=config.get("bf16_matmul", "native"),
                  widened_ops=dict(widen.counts) if isinstance(widen, Bf16MatmulInFp32) else {})
    return result


USAGE = "usage: python -m qlora_triton.finetune.phase [--wait METHOD] SPEC.json OUT.json"


def main(argv: list[str] | None = None) -> int:
    """``SPEC OUT``: run the phase SPEC describes. ``--wait METHOD SPEC OUT``: import
    what METHOD needs, then wait for a line on stdin before reading SPEC (which
    need not exist until then); end of input instead: exit without running."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wait"] and len(argv) == 4:
        _, method, *argv = argv
        preload(method)
        if not sys.stdin.readline():  # the parent gave up before handing the phase over
            return 0
    if len(argv) != 2 or argv[0].startswith("--"):
        print(USAGE, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run_phase(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    status = main()
    # The result is on disk: skip the interpreter's teardown of torch and transformers
    # (about a second on 2 CPU cores), which the parent would otherwise wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
