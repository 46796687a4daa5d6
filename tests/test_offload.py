"""Offloaded checkpoints (qlora_triton.offload): the same loss and grads as plain
gradient checkpointing, and the layer inputs really leave the compute device
(on the CPU: the hook drops its device reference and counts what it moved).
"""

from __future__ import annotations

import dataclasses
import random
import weakref

import pytest
import torch

import qlora_triton as qt
from qlora_triton.offload import offload_checkpoints
from qlora_triton.training import disable_checkpointing, enable_checkpointing

pytest.importorskip("transformers")


def tiny_qlora(seed: int, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=61, max_position_embeddings=64,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    qt.replace_linear(model, r=4, progress=False)
    with torch.no_grad():  # adapters that are not zero, so every LoRA grad is
        for m in model.modules():
            if isinstance(m, qt.LoRALinear4bit):
                m.lora_B.weight.normal_(0.0, 0.1)
    enable_checkpointing(model)
    return model.train()


def _step(model, ids):
    """Loss, LoRA grads and how many layer inputs are still alive after the forward."""
    refs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
             for layer in model.model.layers]
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    # layer 0's input (the frozen embeddings' output) is a graph leaf that autograd
    # itself keeps: count the inputs of the layers above it
    alive = sum(r() is not None for r in refs[1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, alive


def test_offload_same_grads_and_inputs_leave_the_device(device):
    model = tiny_qlora(seed=random.randint(0, 999)).to(device)
    ids = torch.randint(0, 61, (2, random.randint(9, 23)), device=device)
    with qt.force_backend("torch"):
        loss0, grads0, alive0 = _step(model, ids)
        stats = offload_checkpoints(model)
        assert offload_checkpoints(model) is stats  # idempotent
        loss1, grads1, alive1 = _step(model, ids)
    layers = len(model.model.layers)
    # without offload checkpointing keeps every layer's input; with it, none stays behind
    assert alive0 == layers - 1 and alive1 == 0
    hidden_bytes = ids.numel() * model.config.hidden_size * 4
    assert (stats.offloaded_tensors, stats.restored_tensors) == (layers, layers)
    assert stats.offloaded_bytes == layers * hidden_bytes and stats.peak_host_bytes == layers * hidden_bytes
    assert stats.host_bytes == 0  # all brought back and released
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_offload_survives_trainer_style_reenable_and_undo(device):
    model = tiny_qlora(seed=3, layers=2).to(device)
    ids = torch.randint(0, 61, (1, 13), device=device)
    with qt.force_backend("torch"):
        stats = offload_checkpoints(model)
        disable_checkpointing(model)
        # what Trainer(gradient_checkpointing=True) does at the start of train()
        enable_checkpointing(model)
        _, _, alive = _step(model, ids)
        assert alive == 0 and stats.offloaded_tensors == 2
        offload_checkpoints(model, enable=False)
        _, _, alive = _step(model, ids)
        assert alive == 1 and stats.offloaded_tensors == 2
        with pytest.raises(ValueError, match="use_reentrant"):
            offload_checkpoints(model)
            enable_checkpointing(model, {"use_reentrant": True})


def test_save_on_cpu_around_the_checkpoint_moves_the_same_inputs(device):
    # transformers' offload=True wraps non-reentrant checkpointing in save_on_cpu: its
    # hooks see the layer inputs checkpoint saves, the same tensors our hook moves
    import functools

    from torch.utils.checkpoint import checkpoint

    packed = []

    def pack(t):
        packed.append(t.numel() * t.element_size())
        return t

    def save_on_host_checkpoint(function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return checkpoint(function, *args, **kwargs)

    ids = torch.randint(0, 61, (1, 9), device=device)
    with qt.force_backend("torch"):
        theirs = tiny_qlora(seed=5, layers=3).to(device)
        theirs._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(save_on_host_checkpoint, use_reentrant=False))
        _step(theirs, ids)
        ours = tiny_qlora(seed=5, layers=3).to(device)
        stats = offload_checkpoints(ours)
        _step(ours, ids)
    assert len(packed) == stats.offloaded_tensors == 3
    assert sum(packed) == stats.offloaded_bytes


def test_offload_bad_input():
    with pytest.raises(TypeError, match="model"):
        offload_checkpoints(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="enable"):
        offload_checkpoints(tiny_qlora(0, layers=1), enable=1)


def test_offload_with_trainer(tmp_path):
    Dataset = pytest.importorskip("datasets").Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_qlora(seed=7, layers=2)
    stats = offload_checkpoints(model)
    rows = [{"input_ids": torch.randint(0, 61, (12,)).tolist()} for _ in range(4)]
    data = Dataset.from_list([{**r, "labels": r["input_ids"]} for r in rows])
    # transformers' newer name for the option where it has it (the old one goes in v6)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             learning_rate=1e-3, **{checkpointing: True})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with qt.force_backend("torch"):
        Trainer(model=model, args=args, train_dataset=data).train()
    assert stats.offloaded_tensors == 2 * 2 and stats.restored_tensors == 4  # 2 steps x 2 layers
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


# -- FSDP2 (gloo on the CPU) -----------------------------------------------------------

def fsdp_offload_checks(seed: int) -> dict:
    from qlora_triton import distributed as qtd

    out = {}
    with qt.force_backend("torch"):
        for offload in (False, True):
            model = tiny_qlora(seed, layers=2)
            qtd.shard_model(model)
            stats = offload_checkpoints(model) if offload else None
            ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(seed))
            loss, grads, alive = _step(model, ids)
            out[offload] = {"loss": loss, "alive": alive,
                            "grads": {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for n, g in grads.items()},
                            "moved": stats.offloaded_tensors if stats else 0}
    return out


def test_offload_with_fsdp2(dist2):
    for rank in dist2.run(fsdp_offload_checks, 11):
        plain, off = rank[False], rank[True]
        assert off["moved"] == 2 and off["alive"] == 0 and plain["alive"] == 1
        assert torch.equal(plain["loss"], off["loss"])
        for name, g in plain["grads"].items():
            assert torch.equal(g, off["grads"][name]), name
