"""save_adapter's config: task_type from the model's head, base_model_name_or_path
from the folder it was loaded from (tiny random models, no hub)."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_triton as qt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def bert_config():
    return transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=64, max_position_embeddings=32)


def saved_config(path):
    with open(path / "adapter_config.json") as f:
        return json.load(f)


def test_encoder_adapter_has_no_task_type_and_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    qt.replace_linear(model, target_modules=["query", "value"], r=2, progress=False)
    for m in model.modules():
        if isinstance(m, qt.LoRALinear4bit):
            torch.nn.init.normal_(m.lora_B.weight)
    qt.save_adapter(model, tmp_path / "adapter")
    config = saved_config(tmp_path / "adapter")
    assert config["task_type"] is None and config["base_model_name_or_path"] is None
    # PEFT reads it into a dense BertModel (a plain PeftModel, no causal-LM head needed)
    dense = transformers.BertModel(bert_config())
    loaded = peft.PeftModel.from_pretrained(dense, tmp_path / "adapter")
    assert type(loaded) is peft.PeftModel
    ours = {n: m.lora_A.weight for n, m in model.named_modules() if isinstance(m, qt.LoRALinear4bit)}
    theirs = dict(loaded.named_parameters())
    for name, weight in ours.items():
        assert torch.equal(theirs[f"base_model.model.{name}.lora_A.default.weight"], weight)


@pytest.mark.parametrize("head, task", [("AutoModelForCausalLM", "CAUSAL_LM"),
                                        ("AutoModelForSequenceClassification", "SEQ_CLS"),
                                        ("AutoModelForTokenClassification", "TOKEN_CLS")])
def test_task_type_and_base_path_come_from_the_model(tmp_path, head, task):
    folder = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, pad_token_id=0)).save_pretrained(folder)
    model = getattr(transformers, head).from_pretrained(folder)
    qt.replace_linear(model, target_modules=["q_proj"], r=2, progress=False)
    qt.save_adapter(model, tmp_path / "adapter")
    config = saved_config(tmp_path / "adapter")
    assert config["task_type"] == task and config["base_model_name_or_path"] == str(folder)
    qt.save_adapter(model, tmp_path / "given", base_model_name_or_path="org/name", task_type=None)
    config = saved_config(tmp_path / "given")
    assert config["task_type"] is None and config["base_model_name_or_path"] == "org/name"
