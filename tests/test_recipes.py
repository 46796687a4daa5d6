"""The recipes users copy, run as they write them, on tiny Llama, Qwen2 and GPT-2
models built from configs (no downloads): save then reload (``save_pretrained``,
``Trainer.save_model``), PEFT's ``"all-linear"`` with ``SFTTrainer(peft_config=...)``,
a bitsandbytes folder whose nested scales are stored in bf16 through every
loading path, ``prepare_model_for_kbit_training`` after ``replace_linear``,
merging (``merge_adapter``, ``merge_and_quantize``), and the one-line message
for a missing extra.

These test the integration, not the kernels (whose own tests run both
backends): the layers run the plain-torch backend here, so that the whole file
stays within a few seconds under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import qlora_triton as qt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from helpers import logits, rel_err, tokens, word_tokenizer  # noqa: E402

SMALL = dict(num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
# hidden 64 / intermediate 128: every weight's columns a multiple of the blocksize,
# outside bitsandbytes' CPU dequantize bug (DESIGN.md, Tests).
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, **SMALL),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with qt.force_backend("torch"):
        yield


def dense_model(arch, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()  # (GPT-2 has dropout)
    with torch.no_grad():  # random biases (Qwen2's q/k/v, GPT-2's), so that a lost bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def trained(model):
    """Adapters as after training: B no longer zero, so that a lost adapter shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def assert_same_state(model, again):
    ours, theirs = model.state_dict(), again.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


# -- 1. every save reloads -----------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_after_replace_linear_reloads_with_adapters(arch, tmp_path):
    model = trained(dense_model(arch))
    qt.replace_linear(model, r=4, lora_alpha=8, progress=False)
    x = tokens()
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "qlora_triton"
    for load in (transformers.AutoModelForCausalLM.from_pretrained, qt.from_pretrained):
        again = load(tmp_path)
        assert_same_state(model, again)  # NF4 bytes and adapters, bit for bit
        assert sum(isinstance(m, qt.LoRALinear4bit) for m in again.modules()) == \
            sum(isinstance(m, qt.LoRALinear4bit) for m in model.modules())
        assert torch.equal(logits(again, x), ref)
        trainable = {n for n, p in again.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_save_model_reloads(tmp_path):
    model = trained(dense_model("llama"))
    qt.replace_linear(model, target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, progress=False)
    model.model.layers[0].self_attn.q_proj.lora_alpha = 7  # a layer whose settings differ
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=args).save_model(str(tmp_path / "saved"))
    again = qt.from_pretrained(tmp_path / "saved")
    assert_same_state(model, again)
    assert again.model.layers[0].self_attn.q_proj.lora_alpha == 7
    assert again.model.layers[1].self_attn.q_proj.lora_alpha == 4
    x = tokens()
    assert torch.equal(logits(again, x), logits(model, x))


def test_a_folder_with_adapters_but_no_settings_names_the_route(tmp_path):
    model = trained(dense_model("llama"))
    qt.replace_linear(model, r=2, progress=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]["lora"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no LoRA settings.*load_adapter"):
        qt.from_pretrained(tmp_path)


# -- 2. PEFT targets our layers like its own 4-bit layers -------------------------------

def nf4_folder(arch, tmp_path):
    dense_model(arch).save_pretrained(tmp_path / "dense")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qt.NF4Config())


@pytest.mark.parametrize("arch, targets", [("llama", "all-linear"), ("gpt2", "all-linear"),
                                           ("qwen2", r".*\.(q_proj|down_proj)"), ("qwen2", ["k_proj", "up_proj"])])
def test_peft_targets_our_layers(arch, targets, tmp_path):
    model = nf4_folder(arch, tmp_path)
    ours = {n for n, m in model.named_modules() if isinstance(m, qt.Linear4bit)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if type(m).__name__ == "LoraNF4Linear"}
    if targets == "all-linear":
        assert adapted == ours and "lm_head" not in adapted  # every NF4 layer, never the head
    else:
        wanted = {n for n in ours if n.rsplit(".", 1)[-1] in ("q_proj", "down_proj", "k_proj", "up_proj")}
        assert adapted and adapted == {n for n in wanted if n.rsplit(".", 1)[-1] in
                                       (("q_proj", "down_proj") if isinstance(targets, str) else
                                        ("k_proj", "up_proj"))}


def test_sft_trainer_with_all_linear_then_save_and_reload(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(12)) for i in range(8)]
    model = nf4_folder("qwen2", tmp_path)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, max_length=16,
                         dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.train()
    assert sum(type(m).__name__ == "LoraNF4Linear" for m in trainer.model.modules()) == 14
    trainer.save_model(str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qt.NF4Config())
    again = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    x = tokens()
    trainer.model.eval()  # (SFTTrainer trained it in bf16: bf16's tolerance)
    assert rel_err(logits(again, x).float(), logits(trainer.model, x).float()) <= 1e-2
    assert any(bool(p.abs().sum() > 0) for n, p in again.named_parameters() if "lora_B" in n)  # it trained


# -- 3. one reader of bitsandbytes state dicts -----------------------------------------

def bf16_nested(sd, name):
    """Layer ``name``'s state rewritten as bitsandbytes writes it after its
    AVX512-BF16 CPU repacking of a bf16 model: scales in bf16, re-nested
    (offset = their bf16 mean), ``"nested_dtype": "bfloat16"``."""
    qw = qt.NF4Weight.from_state_dict(sd, f"{name}.weight")
    scales = qw.absmax_fp32().to(torch.bfloat16)
    offset = scales.mean()
    q, absmax2 = qt.quantize_blockwise_8bit(scales - offset, qt.dynamic_map(), 256)
    meta = {"quant_type": "nf4", "blocksize": qw.blocksize, "dtype": "bfloat16", "shape": list(qw.shape),
            "nested_blocksize": 256, "nested_dtype": "bfloat16", "nested_offset": offset.item()}
    sd[f"{name}.weight.absmax"], sd[f"{name}.weight.nested_absmax"] = q, absmax2
    sd[f"{name}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                      dtype=torch.uint8)


def test_bf16_nested_bitsandbytes_folder_through_every_loading_path(tmp_path, bnb):
    bnb_functional = bnb.functional
    model = dense_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qt.NF4Config())
    folder = tmp_path / "bnb"
    q.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    names = sorted({k.rsplit(".weight.quant_state", 1)[0] for k in sd if ".quant_state." in k})
    for name in names:
        bf16_nested(sd, name)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qt.NF4Config(compute_dtype="bfloat16").to_bnb()
    (folder / "config.json").write_text(json.dumps(config))

    # the oracle: bitsandbytes' own dequantize of each stored layer
    def bnb_weight(name):
        state = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight.")}
        quant_state = bnb_functional.QuantState.from_dict(state, torch.device("cpu"))
        return bnb_functional.dequantize_4bit(sd[name + ".weight"], quant_state)

    expected = {name: bnb_weight(name) for name in names}
    # NF4Weight.from_bnb on bitsandbytes' own QuantState of it (state2 in bf16)
    name = names[-1]
    state = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight.")}
    quant_state = bnb_functional.QuantState.from_dict(state, torch.device("cpu"))
    assert quant_state.state2.dtype == torch.bfloat16
    assert torch.equal(qt.dequantize_nf4(qt.NF4Weight.from_bnb(sd[name + ".weight"], quant_state)),
                       expected[name])
    # NF4Weight.from_state_dict, also under PEFT's base_layer. prefix
    for name in names:
        assert torch.equal(qt.dequantize_nf4(qt.NF4Weight.from_state_dict(sd, f"{name}.weight")), expected[name])
    peft_sd = {k.replace(f"{names[0]}.weight", f"{names[0]}.base_layer.weight"): v for k, v in sd.items()}
    assert torch.equal(qt.dequantize_nf4(qt.NF4Weight.from_state_dict(peft_sd, f"{names[0]}.weight")),
                       expected[names[0]])
    # load_state_dict into a replace_linear model
    converted = dense_model("llama").to(torch.bfloat16)
    qt.replace_linear(converted, progress=False)
    missing, unexpected = converted.load_state_dict(sd, strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    loaded = {"load_state_dict": converted, "qt.from_pretrained": qt.from_pretrained(folder)}
    transformers_bnb = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    for route, m in loaded.items():
        layers = {n: l for n, l in m.named_modules() if isinstance(l, qt.Linear4bit)}
        assert sorted(layers) == names, route
        for name in names:
            assert torch.equal(layers[name].dequantized_weight(), expected[name]), (route, name)
    x = tokens()
    base = qt.from_pretrained(folder)
    assert rel_err(logits(base, x).float(), logits(transformers_bnb, x).float()) <= 1e-2  # bf16 compute


def test_plain_absmax_in_bf16_and_in_the_repacked_layout():
    w = torch.randn(48, 128)  # rows > 1, cols a multiple of the blocksize
    qw = qt.quantize_nf4(w, blocksize=64, double_quant=False)
    scales = qw.absmax.to(torch.bfloat16)  # as a bf16 model's plain absmax is stored
    reference = qt.dequantize_nf4(qt.NF4Weight(packed=qw.packed, absmax=scales.float(), shape=qw.shape,
                                               dtype=qw.dtype, blocksize=64, code=qw.code))
    sd = qw.state_dict()
    for stored in (scales, scales.reshape(48, 2).t().contiguous()):  # flat; [cols / 64, rows]
        sd["weight.absmax"] = stored
        assert torch.equal(qt.dequantize_nf4(qt.NF4Weight.from_state_dict(sd)), reference)


# -- 4. prepare_model_for_kbit_training after replace_linear ----------------------------

def test_prepare_model_for_kbit_training_keeps_our_adapters_trainable():
    model = dense_model("llama")
    qt.replace_linear(model, r=2, progress=False)
    trained(model)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    model = peft.prepare_model_for_kbit_training(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    model.train()
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n in adapters]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads if g is not None)
    assert sum(g is not None for g in grads) == len(adapters)


# -- 5. merging -----------------------------------------------------------------------

def test_merge_adapter_dense_fp32_keeps_outputs_and_nf4_merge_rounds():
    model = trained(dense_model("llama"))
    qt.replace_linear(model, r=4, progress=False)
    x = tokens()
    ref = logits(model, x)
    import copy

    dense = qt.merge_adapter(copy.deepcopy(model), dense=True)
    assert not any(isinstance(m, qt.Linear4bit) for m in dense.modules())
    assert rel_err(logits(dense, x), ref) <= 1e-5  # lossless up to fp32 rounding
    requantized = qt.merge_adapter(copy.deepcopy(model), dense=False)
    layers = [m for m in requantized.modules() if isinstance(m, qt.Linear4bit)]
    assert layers and not any(isinstance(m, qt.LoRALinear4bit) for m in layers)
    err = rel_err(logits(requantized, x), ref)
    assert 0 < err <= 0.25  # NF4's rounding of the merged weights, nothing worse
    with pytest.raises(ValueError, match="dtype"):
        qt.merge_adapter(copy.deepcopy(model), dense=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        qt.merge_adapter(dense)


def test_merge_and_quantize_loads_in_transformers_with_bitsandbytes(tmp_path, bnb):
    import copy

    model = trained(dense_model("llama"))
    qt.replace_linear(model, r=4, progress=False)
    before = copy.deepcopy(model.state_dict())
    qt.merge_and_quantize(model, tmp_path / "merged")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model unchanged
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert isinstance(theirs.config.quantization_config, transformers.BitsAndBytesConfig)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == 14
    ours = qt.from_pretrained(tmp_path / "merged")
    dense = qt.merge_adapter(copy.deepcopy(model), dense=True)
    requantized = copy.deepcopy(dense)  # the merged dense model quantized the usual way
    qt.replace_linear(requantized, progress=False)
    x = tokens()
    assert rel_err(logits(theirs, x), logits(ours, x)) <= 1e-5
    assert rel_err(logits(ours, x), logits(requantized, x)) <= 1e-5
    assert rel_err(logits(ours, x), logits(dense, x)) <= 0.25  # NF4's rounding of the merged weights


# -- 8. a missing extra is named in one line ---------------------------------------------

def test_missing_transformers_names_the_extra(tmp_path, monkeypatch, capsys):
    from qlora_triton.cli import main
    from qlora_triton.extras import MissingExtraError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    extra = 'pip install "qlora_triton[hf]"'
    with pytest.raises(MissingExtraError, match=r"qlora_triton\.from_pretrained needs the 'transformers'"):
        qt.from_pretrained(tmp_path)
    for name in ("NF4Config", "merge_and_quantize"):
        with pytest.raises(MissingExtraError) as info:
            getattr(qt, name)
        assert str(info.value).endswith(extra)
    assert main(["finetune", "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-triton finetune: error:") and lines[0].endswith(extra)


def test_a_folder_saved_without_quantization_config_loads_through_qt(tmp_path):
    converted = dense_model("qwen2")  # layers swapped by hand: NF4 tensors, no quantization_config
    for name, module in list(converted.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(converted.get_submodule(parent), child, qt.Linear4bit.from_linear(module))
    converted.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = qt.from_pretrained(tmp_path)
    assert_same_state(converted, again)
