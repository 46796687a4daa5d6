"""PEFT's get_peft_model (and TRL's SFTTrainer) on our Linear4bit layers, and
qt.prepare_for_kbit_training. Tiny models from configs, no hub."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_triton as qt
import qlora_triton.lora as lora_mod
from helpers import logits, word_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the forward and backward runs of the fused LoRANF4Function."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = lora_mod.LoRANF4Function.forward, lora_mod.LoRANF4Function.backward

    def counted_forward(ctx, *args):
        calls["forward"] += 1
        return forward(ctx, *args)

    def counted_backward(ctx, *args):
        calls["backward"] += 1
        return backward(ctx, *args)

    monkeypatch.setattr(lora_mod.LoRANF4Function, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(lora_mod.LoRANF4Function, "backward", staticmethod(counted_backward))
    return calls


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def load_nf4(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=qt.NF4Config(), **kwargs)


def test_peft_layer_equals_lora_linear4bit(fused_calls):
    torch.manual_seed(1)
    model = nn.Sequential(qt.Linear4bit.from_linear(nn.Linear(70, 45)))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    assert type(layer).__name__ == "LoraNF4Linear"
    nn.init.normal_(layer.lora_B["default"].weight)
    ref = qt.LoRALinear4bit(layer.base_layer.quant_weight, layer.base_layer.bias, r=3, lora_alpha=5)
    with torch.no_grad():
        ref.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ref.lora_B.weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 70)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = peft_model(x1)
    assert fused_calls["forward"] == 1
    y2 = ref(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    assert fused_calls["backward"] == 1
    y2.backward(g)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, ref.lora_A.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, ref.lora_B.weight.grad, rtol=1e-5, atol=1e-6)


def test_get_peft_model_trains_saves_and_switches_adapters(llama_folder, tmp_path, fused_calls):
    model = load_nf4(llama_folder)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS))
    layers = [m for m in peft_model.modules() if type(m).__name__ == "LoraNF4Linear"]
    assert len(layers) == 14
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 128, (4, 16))
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert fused_calls["forward"] >= 12 * 14 and fused_calls["backward"] >= 12 * 14
    peft_model.eval()
    want = logits(peft_model, x)
    with peft_model.disable_adapter():
        base = logits(peft_model, x)
    assert torch.equal(base, logits(load_nf4(llama_folder), x))
    assert not torch.allclose(base, want)

    peft_model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(load_nf4(llama_folder), tmp_path)
    assert torch.equal(logits(again, x), want)

    # a second adapter: its own weights, switched by name
    peft_model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    peft_model.set_adapter("other")
    for m in peft_model.modules():
        if type(m).__name__ == "LoraNF4Linear" and "other" in m.lora_B:
            nn.init.normal_(m.lora_B["other"].weight, std=0.5)
    other = logits(peft_model, x)
    assert not torch.allclose(other, want) and not torch.allclose(other, base)
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model, x), want)

    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = qt.quantize_nf4(qt.dequantize_nf4(q_proj.base_layer.quant_weight, torch.float32)
                               + q_proj.get_delta_weight("default"))
    merged = peft_model.merge_and_unload()  # requantizes W + s * B @ A
    assert not any(type(m).__name__ == "LoraNF4Linear" for m in merged.modules())
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight.reshape(-1), expected.packed)
    got = logits(merged, x)
    assert (got - want).norm() < (base - want).norm()


def test_prepare_for_kbit_training_keeps_dtypes_and_adapters(llama_folder, fused_calls):
    model = load_nf4(llama_folder, dtype=torch.bfloat16)
    dtypes = {n: t.dtype for n, t in model.state_dict().items()}
    assert qt.prepare_for_kbit_training(model) is model
    assert {n: t.dtype for n, t in model.state_dict().items()} == dtypes
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # either transformers
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    peft_model.train()
    x = torch.randint(0, 128, (2, 12))
    peft_model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert fused_calls["backward"] >= 4
    # after replace_linear too: nothing is frozen (PEFT's version freezes the adapters)
    dense = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    qt.replace_linear(dense, r=2, progress=False)
    qt.prepare_for_kbit_training(dense)
    assert any(p.requires_grad for p in dense.parameters())
    with pytest.raises(TypeError, match="model"):
        qt.prepare_for_kbit_training(nn.Linear(2, 2))


def test_peft_kbit_preparation_leaves_the_nf4_storage_alone(llama_folder):
    # PEFT upcasts every fp16/bf16 parameter to fp32; the NF4 storage is integer
    # Parameters, so its bytes and dtypes stay as they are (the norms do change).
    model = load_nf4(llama_folder, dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, qt.Linear4bit)]
    before = [{n: p.detach().clone() for n, p in m.nf4_parameters().items()} for m in layers]
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    for m, was in zip(layers, before):
        now = m.nf4_parameters()
        assert now.keys() == was.keys()
        assert all(now[n].dtype == t.dtype and torch.equal(now[n], t) for n, t in was.items())
    x = torch.randint(0, 128, (2, 7))
    assert torch.isfinite(logits(model, x)).all()


def test_counts_take_nf4_weights_at_their_dense_size(llama_folder):
    from qlora_triton.convert import count_parameters

    dense = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    n_dense = sum(p.numel() for p in dense.parameters())
    report = qt.replace_linear(dense, r=2, progress=False)
    lora = sum(p.numel() for n, p in dense.named_parameters() if "lora_" in n)
    assert count_parameters(dense) == (lora, n_dense + lora)
    assert report.total_params == n_dense + lora


def test_peft_refuses_our_already_adapted_layers():
    model = nn.Sequential(qt.LoRALinear4bit.from_linear(nn.Linear(8, 8), r=2))
    with pytest.raises(ValueError, match="LoRALinear4bit"):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))


def test_sft_trainer_runs_on_an_nf4_model(llama_folder, tmp_path, fused_calls):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(12)) for i in range(16)]
    model = load_nf4(llama_folder)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, max_length=16, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS))
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss == result.training_loss
    assert sum(type(m).__name__ == "LoraNF4Linear" for m in trainer.model.modules()) == 14
    assert fused_calls["backward"] >= 3 * 14
