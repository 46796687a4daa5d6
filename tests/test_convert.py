"""replace_linear / merge_and_unload on toy models and a tiny transformers
LlamaForCausalLM (random init, no downloads)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import qlora_triton as qt
from helpers import rel_err

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=False):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_default_targets_every_linear_but_the_head(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="qlora_triton"):
        report = qt.replace_linear(model, r=4, progress=False)
    assert len(report.replaced) == 14 and "lm_head" not in report.replaced
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, qt.LoRALinear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 28
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # total counts the NF4 weights at their dense size: it equals the dense model's count plus LoRA.
    assert report.total_params == sum(p.numel() for p in tiny_llama().parameters()) + report.trainable_params
    assert "trainable params" in caplog.text and "trainable%" in str(report)


def test_tied_head_is_left_alone():
    model = tiny_llama(tie=True)
    qt.replace_linear(model, r=2, progress=False)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight

    class Tied(nn.Module):  # no get_output_embeddings, no lm_head name: tied by weight
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

    tied = Tied()
    assert qt.replace_linear(tied, progress=False).replaced == ["hidden"]


def test_suffix_list_and_regex_targets():
    model = tiny_llama()
    report = qt.replace_linear(model, target_modules=["q_proj", "v_proj"], r=2, progress=False)
    assert sorted(report.replaced) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                             for p in ("q_proj", "v_proj"))
    model = tiny_llama()
    report = qt.replace_linear(model, target_modules=r"model\.layers\.1\.mlp\..*_proj", r=2, progress=False)
    assert report.replaced == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    # A suffix matches whole name parts only ("proj" is not a suffix of "q_proj" here).
    with pytest.raises(ValueError, match="matched no linear layer"):
        qt.replace_linear(tiny_llama(), target_modules=["proj"], progress=False)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(target_modules="("), ValueError, "regex"), (dict(target_modules=[]), TypeError, "target_modules"),
    (dict(r=0), ValueError, "r must"), (dict(lora_alpha=-1), ValueError, "lora_alpha"),
    (dict(lora_dropout=2), ValueError, "lora_dropout"), (dict(blocksize=7), ValueError, "blocksize"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        qt.replace_linear(nn.Sequential(nn.Linear(4, 4)), progress=False, **kwargs)
    with pytest.raises(TypeError, match="model"):
        qt.replace_linear("not a model")


def test_training_lowers_the_loss_and_changes_only_lora():
    model = tiny_llama()
    qt.replace_linear(model, r=8, lora_alpha=16, lora_dropout=0.05, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 128, (4, 24))
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and max(losses[-5:]) < min(losses[:5]), losses
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if ".lora_A." in k or ".lora_B." in k}


def test_merge_and_unload_matches_the_lora_model():
    model = tiny_llama().eval()
    qt.replace_linear(model, r=4, progress=False)
    for m in model.modules():
        if isinstance(m, qt.LoRALinear4bit):
            with torch.no_grad():
                m.lora_B.weight.normal_(0, 0.1)
    tokens = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    expected_w = (qt.dequantize_nf4(q_proj.quant_weight, torch.float32)
                  + q_proj.scaling * q_proj.lora_B.weight.detach() @ q_proj.lora_A.weight.detach())
    merged = qt.merge_and_unload(model)
    assert merged is model
    assert not any(isinstance(m, qt.Linear4bit) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, expected_w, atol=1e-6)
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    assert rel_err(got, want) <= 1e-3


def test_merge_and_unload_of_plain_linear4bit():
    linear = nn.Linear(30, 20)
    layer = qt.Linear4bit.from_linear(linear)
    dense = qt.merge_and_unload(layer)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    assert torch.equal(dense.weight, qt.dequantize_nf4(layer.quant_weight))
    assert torch.equal(dense.bias, linear.bias.detach())


def test_merge_and_unload_after_half():
    """.half() keeps the NF4 scales fp32 but makes the bias fp16: the merged
    layer must still be one dtype."""
    layer = qt.LoRALinear4bit.from_linear(nn.Linear(30, 20), r=4).half()
    nn.init.normal_(layer.lora_B.weight)
    dense = qt.merge_and_unload(layer)
    assert dense.weight.dtype == dense.bias.dtype
    x = torch.randn(5, 30, dtype=dense.weight.dtype)
    assert torch.isfinite(dense(x)).all()


def test_bnb_checkpoint_in_transformers_layout_loads(bnb):
    """A transformers bnb-4bit checkpoint stores each quantized Linear under
    bitsandbytes' keys; the converted model loads it with only LoRA keys missing."""
    source = tiny_llama()
    checkpoint, bnb_dense = {}, {}
    for name, module in source.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.load_state_dict(module.state_dict())
            q = q.to("cpu")
            bnb_dense[name] = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
            checkpoint.update({f"{name}.{k}": v.clone() for k, v in q.state_dict().items()})
    dense_keys = {k for k in source.state_dict() if not any(k.startswith(n + ".") for n in
                  [n for n, m in source.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"])}
    checkpoint.update({k: source.state_dict()[k] for k in dense_keys})

    model = tiny_llama()
    qt.replace_linear(model, r=4, progress=False)
    result = model.load_state_dict(checkpoint, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".lora_" in k for k in result.missing_keys)
    assert set(checkpoint) <= set(model.state_dict())
    sd = model.state_dict()
    for k, v in checkpoint.items():
        assert torch.equal(sd[k].reshape(-1), v.reshape(-1)), k
    for name, w in bnb_dense.items():  # bitsandbytes' own dequantize of the same bytes
        assert torch.equal(model.get_submodule(name).dequantized_weight(torch.float32), w.float()), name


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, qt.LoRALinear4bit)}


def test_second_call_changes_nothing_and_says_so(caplog):
    model = tiny_llama()
    qt.replace_linear(model, r=4, progress=False)
    for m in _lora_layers(model).values():
        nn.init.normal_(m.lora_B.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="qlora_triton"):
        report = qt.replace_linear(model, r=4, progress=False)
    assert report.replaced == [] and len(report.already_converted) == 14
    assert "nothing to do" in caplog.text
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the adapters' own nn.Linear (lora_A, lora_B) are never targets, even by name
    with pytest.raises(ValueError, match="matched no linear layer"):
        qt.replace_linear(model, target_modules=["lora_A"], progress=False)


def test_every_target_is_checked_before_any_is_changed():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight contains NaN"):
        qt.replace_linear(model, progress=False)
    assert not any(isinstance(m, qt.Linear4bit) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_meta_model_points_to_the_loading_path():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device.*NF4Config"):
        qt.replace_linear(model, progress=False)


def test_linear_subclass_is_converted():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    report = qt.replace_linear(model, r=2, progress=False)
    assert report.replaced == ["0", "2"] and isinstance(model[0], qt.LoRALinear4bit)


def test_multihead_attention_out_proj_is_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    assert qt.replace_linear(model, progress=False).replaced == ["1"]
    assert type(model[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_explicitly_targeted_tied_head_warns_and_stays_tied(caplog):
    model = tiny_llama(tie=True)
    params = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="qlora_triton"):
        report = qt.replace_linear(model, target_modules=["lm_head", "q_proj"], r=2, progress=False)
    assert "lm_head.weight is tied to model.embed_tokens.weight" in caplog.text and "left it dense" in caplog.text
    assert report.tied == ["lm_head"] and "lm_head" not in report.replaced
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in _lora_layers(model).values())
    assert report.total_params == params + lora
    with pytest.raises(ValueError, match="tied"):
        qt.replace_linear(tiny_llama(tie=True), target_modules=["lm_head"], progress=False)


def test_gpt2_conv1d_is_quantized_transposed():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    ref = copy.deepcopy(model)  # the reference: each Conv1D will hold its dequantized weight
    tokens = torch.randint(0, 128, (2, 13))
    report = qt.replace_linear(model, r=2, progress=False)
    assert len(report.replaced) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    for name in report.replaced:
        layer = model.get_submodule(name)
        conv = ref.get_submodule(name)
        with torch.no_grad():
            conv.weight.copy_(layer.dequantized_weight(torch.float32).t())
            conv.bias.copy_(layer.bias)
    with torch.no_grad():
        got, want = model(input_ids=tokens).logits, ref(input_ids=tokens).logits
    assert rel_err(got, want) <= 1e-5


def test_our_linear4bit_gets_adapters_without_requantization():
    model = tiny_llama()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, qt.Linear4bit.from_linear(m, blocksize=128))
    packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, qt.Linear4bit)}
    report = qt.replace_linear(model, r=2, blocksize=64, progress=False)
    assert sorted(report.replaced) == sorted(packed)
    for name, want in packed.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, qt.LoRALinear4bit) and layer._blocksize == 128
        assert torch.equal(layer.weight, want)


def test_bitsandbytes_layers_keep_their_bytes(bnb, monkeypatch):
    model = tiny_llama().eval()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compress_statistics=name.endswith("proj") and "mlp" in name, quant_type="nf4")
            q.load_state_dict(m.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    stored = {n: {k: v.clone() for k, v in m.state_dict().items()}
              for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    def no_dequantize(*args, **kwargs):
        raise AssertionError("replace_linear must not dequantize a bitsandbytes layer")

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", no_dequantize)
    report = qt.replace_linear(model, r=2, progress=False)
    assert sorted(report.replaced) == sorted(stored)
    for name, sd in stored.items():
        ours = model.get_submodule(name).state_dict()
        for key, value in sd.items():
            assert torch.equal(ours[key].reshape(-1), value.reshape(-1)), (name, key)


def test_peft_layers_are_never_entered():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    report = qt.replace_linear(model, progress=False)
    assert not any(".base_layer" in n or ".lora_" in n for n in report.replaced)
    assert not any(n.endswith("q_proj") for n in report.replaced) and len(report.replaced) == 12
