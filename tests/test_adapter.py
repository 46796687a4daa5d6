"""save_adapter / load_adapter in PEFT's format, checked with PEFT itself."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import qlora_triton as qt
from helpers import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")


def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def trained_like(model):
    """Random non-zero adapters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qt.LoRALinear4bit):
                m.lora_A.weight.normal_(0, 0.2)
                m.lora_B.weight.normal_(0, 0.2)
    return model


def dense_base(model):
    """A deep copy of ``model`` whose LoRA layers are dense nn.Linear holding
    our dequantized base weights (no adapter)."""
    import copy
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, qt.LoRALinear4bit):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, qt.Linear4bit(m.quant_weight, m.bias))
    return qt.merge_and_unload(dense)


@pytest.mark.parametrize("targets, rslora", [(None, False), (["q_proj", "v_proj"], True)])
def test_peft_loads_our_adapter_and_matches(tmp_path, targets, rslora):
    model = tiny_llama()
    qt.replace_linear(model, target_modules=targets, r=4, lora_alpha=8, use_rslora=rslora, progress=False)
    trained_like(model)
    qt.save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["bias"] == "none" and config["use_rslora"] == rslora
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny-llama"
    tensors = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 64)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (64, 4)

    peft_model = peft.PeftModel.from_pretrained(dense_base(model), tmp_path).eval()
    assert all(peft_model.get_submodule("base_model.model." + n).r["default"] == 4
               for n, m in model.named_modules() if isinstance(m, qt.LoRALinear4bit))
    tokens = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        want = peft_model(input_ids=tokens).logits
        got = model(input_ids=tokens).logits
    base = dense_base(model)
    with torch.no_grad():
        assert rel_err(base(input_ids=tokens).logits, got) > 1e-2  # the adapter matters
    err = rel_err(got, want)
    assert err <= 1e-2


def test_round_trip_through_our_loader(tmp_path):
    model = tiny_llama()
    qt.replace_linear(model, r=4, lora_alpha=16, progress=False)
    trained_like(model)
    model.model.layers[0].self_attn.q_proj.lora_alpha = 32  # one PEFT config needs uniform settings
    with pytest.raises(ValueError, match="differ"):
        qt.save_adapter(model, tmp_path)
    model.model.layers[0].self_attn.q_proj.lora_alpha = 16
    qt.save_adapter(model, tmp_path)
    other = tiny_llama()
    qt.replace_linear(other, r=4, lora_alpha=2, progress=False)
    other.load_state_dict(model.state_dict())  # the same base
    for m in other.modules():
        if isinstance(m, qt.LoRALinear4bit):
            with torch.no_grad():
                m.lora_B.weight.zero_()
    assert qt.load_adapter(other, tmp_path) is other
    assert other.model.layers[0].mlp.up_proj.lora_alpha == 16  # the adapter's scaling
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(other(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_load_adapter_errors(tmp_path):
    model = tiny_llama()
    qt.replace_linear(model, target_modules=["q_proj", "v_proj"], r=4, progress=False)
    qt.save_adapter(model, tmp_path)

    more = tiny_llama()
    qt.replace_linear(more, target_modules=["q_proj", "v_proj", "o_proj"], r=4, progress=False)
    with pytest.raises(ValueError, match="missing.*o_proj"):
        qt.load_adapter(more, tmp_path)
    fewer = tiny_llama()
    qt.replace_linear(fewer, target_modules=["q_proj"], r=4, progress=False)
    with pytest.raises(ValueError, match="unexpected.*v_proj"):
        qt.load_adapter(fewer, tmp_path)
    rank8 = tiny_llama()
    qt.replace_linear(rank8, target_modules=["q_proj", "v_proj"], r=8, progress=False)
    with pytest.raises(ValueError, match="shape"):
        qt.load_adapter(rank8, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        qt.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        qt.save_adapter(nn.Linear(3, 3), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        qt.load_adapter(model, tmp_path)
    # The layers' own rules apply to the file's settings (dropout 1.0 would
    # divide by zero in the first training step).
    for bad, word in [({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_alpha": -2}, "lora_alpha"),
                      ({"r": 0}, "r must")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=word):
            qt.load_adapter(model, tmp_path)


def test_target_modules_fall_back_to_full_paths(tmp_path):
    model = tiny_llama()
    qt.replace_linear(model, target_modules=r"model\.layers\.0\.self_attn\.q_proj", r=2, progress=False)
    qt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # "q_proj" would match layer 1 too
    peft_model = peft.PeftModel.from_pretrained(dense_base(model), tmp_path)
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert wrapped == ["base_model.model.model.layers.0.self_attn.q_proj"]
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
