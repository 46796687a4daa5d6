"""qt.fuse: the fused MLP and q/k/v Functions against the unfused layers, on
tiny models of each supported family (built from configs, no downloads), the
gated-activation kernel against a float64 reference, packing, refusals, meta
tensors and the launch counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qlora_triton as qt
from qlora_triton import backend as _backend
from qlora_triton.training import enable_checkpointing
from qlora_triton.fused.modules import FusedLoRALinear4bit, FusedLoRAMLP, FusedSingleLoRALinear4bit
from qlora_triton.fused.ops import GELU_TANH, SILU, gated_act, gated_act_backward_

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.launches import count_blocks, count_layer, rest_of_layer  # noqa: E402

# Odd sizes on purpose: head_dim 10, intermediate 56 (blocks of 64 cross rows).
COMMON = dict(vocab_size=53, hidden_size=40, intermediate_size=56, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=64, use_cache=False,
              attn_implementation="sdpa")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v with bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 10}),  # q/k norms
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 10, "hidden_activation": "gelu_pytorch_tanh"}),
}


def _model(family: str, dtype=torch.float32, r: int = 4):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).to(dtype)
    with qt.force_backend("torch"):  # (the same bytes as the Triton quantizer, without the interpreter)
        qt.replace_linear(model, r=r, progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters matter
                p.normal_(0.0, 0.3)
    return model


def _loss_and_grads(model, inputs: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach().float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check(fused, unfused, tol: float) -> None:
    (l1, g1), (l0, g0) = fused, unfused
    assert torch.isfinite(l1) and abs(l1 - l0).item() <= tol * abs(l0).item(), (l1, l0)
    assert g1.keys() == g0.keys()
    worst = max((_rel(g1[n], g0[n]), n) for n in g0)
    assert worst[0] <= tol, worst


def _batch(device, vocab=53, batch=2, seq=11):
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "labels": ids}


# -- the gated activation kernel -------------------------------------------------------
@pytest.mark.parametrize("act", [SILU, GELU_TANH])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_act_and_backward_match_float64_autograd(backend, device, act, dtype, tol):
    M, I = 7, 37
    wide = torch.randn(M, 2 * I + 5, device=device, dtype=dtype) * 3
    gu = wide[:, 3:3 + 2 * I]  # strided rows
    ref_gu = gu.double().cpu().requires_grad_()
    gate, up = ref_gu[:, :I], ref_gu[:, I:]
    if act == SILU:
        a = torch.nn.functional.silu(gate)
    else:
        a = torch.nn.functional.gelu(gate, approximate="tanh")
    ref_h = a * up
    dh = torch.randn(M, I, device=device, dtype=dtype)
    ref_h.backward(dh.double().cpu())

    h = gated_act(gu, act)
    assert _rel(h.double().cpu(), ref_h.detach()) <= tol
    dh_buf, gu_buf = dh.clone(), gu.clone()
    gated_act_backward_(dh_buf, gu_buf, act)  # in place: dh -> h, gu -> [dgate | dup]
    assert _rel(dh_buf.double().cpu(), ref_h.detach()) <= tol
    assert _rel(gu_buf.double().cpu(), ref_gu.grad) <= tol
    assert gated_act(gu[:0], act).shape == (0, I)


def test_gated_act_rejects_bad_input(device):
    with pytest.raises(ValueError, match="act"):
        gated_act(torch.randn(3, 8, device=device), 7)


# -- whole models: fused against unfused -----------------------------------------------
# The model tests run the "dequant" strategy (the training-size path, and the
# one the stacked products change most); under the interpreter it is also the
# cheap one. test_fused_blocks_under_the_small_m_strategies covers the others.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_model_matches_unfused_fp32(backend, device, family):
    model = _model(family).to(device)
    inputs = _batch(device)
    with qt.force_strategy("dequant"):
        unfused = _loss_and_grads(model, inputs)
        qt.fuse(model)
        layer = model.model.layers[0]
        assert isinstance(layer.mlp, FusedLoRAMLP) and type(layer.self_attn.q_proj) is FusedLoRALinear4bit
        assert type(layer.self_attn.o_proj) is FusedSingleLoRALinear4bit
        _check(_loss_and_grads(model, inputs), unfused, 1e-5)


@pytest.mark.parametrize("strategy,tokens", [("gemv", 7), ("fused", 13)])
def test_fused_blocks_under_the_small_m_strategies(backend, device, strategy, tokens):
    """Decode and mid-M sizes: each weight runs its own kernel, outputs stacked."""
    model = _model("qwen2").to(device)  # (q/k/v with biases)
    inputs = _batch(device, batch=1, seq=tokens)
    with qt.force_strategy(strategy):
        unfused = _loss_and_grads(model, inputs)
        qt.fuse(model)
        _check(_loss_and_grads(model, inputs), unfused, 1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strategy,M", [("dequant", 15), ("gemv", 1)])
def test_single_projection_matches_the_lora_layer(backend, device, bias, strategy, M):
    """o_proj's Function (fused/single.py) against the LoRALinear4bit it
    replaces, fp32 (1e-5): output and the gradients of a strided input,
    A, B and the bias; then with only some of them wanted; and without a
    gradient to flow, the layer's own forward (bit for bit)."""
    import copy

    torch.manual_seed(1)
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(40, 24, bias=bias, device=device), r=4, lora_alpha=12)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.3)
    fused = copy.deepcopy(layer)
    fused.__class__ = FusedSingleLoRALinear4bit
    wide = torch.randn(M, 3, 50, device=device)
    seed = torch.randn(M, 3, 24, device=device)

    def run(module, frozen=()):
        x = wide[..., 5:45].detach().requires_grad_()  # strided rows
        for p in module.parameters():
            p.grad = None
        for name in frozen:
            module.get_parameter(name).requires_grad_(False)
        y = module(x)
        y.backward(seed)
        for name in frozen:
            module.get_parameter(name).requires_grad_(True)
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        return y.detach(), x.grad, grads

    with qt.force_strategy(strategy):
        for frozen in ((), ("lora_A.weight",), ("lora_B.weight",)):
            (y1, gx1, g1), (y0, gx0, g0) = run(fused, frozen), run(layer, frozen)
            assert _rel(y1, y0) <= 1e-5 and _rel(gx1, gx0) <= 1e-5
            assert g1.keys() == g0.keys() and all(_rel(g1[n], g0[n]) <= 1e-5 for n in g0), (frozen, g1.keys())
            assert all(g1[n].dtype == torch.float32 for n in g1)
        with torch.no_grad():
            assert torch.equal(fused(wide[..., 5:45]), layer(wide[..., 5:45]))


def test_output_projection_is_fused_only_where_it_can_be():
    """o_proj is fused when it is a LoRALinear4bit without dropout; a dense
    layer, one without an adapter (Linear4bit) or one with dropout stays as it
    is, and the q/k/v and MLP blocks are fused all the same."""
    config = transformers.LlamaConfig(**COMMON)
    model = transformers.LlamaForCausalLM(config)
    qt.replace_linear(model, r=2, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                  "down_proj"], progress=False)
    attn = model.model.layers[0].self_attn
    assert type(attn.o_proj) is torch.nn.Linear  # not a target: left dense
    qt.fuse(model)
    assert type(attn.o_proj) is torch.nn.Linear and type(attn.q_proj) is FusedLoRALinear4bit
    qt.unfuse(model)
    attn.o_proj = qt.Linear4bit.from_linear(attn.o_proj)
    qt.fuse(model)
    assert type(attn.o_proj) is qt.Linear4bit and type(attn.q_proj) is FusedLoRALinear4bit
    model = transformers.LlamaForCausalLM(config)
    qt.replace_linear(model, r=2, progress=False)
    attn = model.model.layers[0].self_attn
    attn.o_proj.lora_dropout = 0.1
    qt.fuse(model)
    assert type(attn.o_proj) is qt.LoRALinear4bit and isinstance(model.model.layers[0].mlp, FusedLoRAMLP)


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in sorted(grads)])


@pytest.mark.parametrize("family", ["llama", "gemma"])  # SiLU, GELU-tanh
def test_fused_blocks_bf16_match_the_fp32_layers(backend, device, family):
    """DESIGN's bf16 tolerance (1e-2) per block: the fused MLP, q/k/v and
    o_proj in bf16 against the unfused layers computing in fp32 (output, input
    gradient and every LoRA gradient)."""
    model = _model(family, torch.bfloat16).to(device)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(3, 5, 40, device=device)
    blocks = {"qkv": lambda t: [attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)], "mlp": lambda t: [mlp(t)],
              "o_proj": lambda t: [attn.o_proj(t)]}
    params = {"qkv": [p for n in ("q_proj", "k_proj", "v_proj") for p in getattr(attn, n).parameters()
                      if p.requires_grad], "mlp": [p for p in mlp.parameters() if p.requires_grad],
              "o_proj": [p for p in attn.o_proj.parameters() if p.requires_grad]}

    def run(block, t):
        t = t.detach().requires_grad_()
        outs = blocks[block](t)
        grads = torch.autograd.grad(outs, [t, *params[block]], [o0.to(o.dtype) for o, o0 in zip(outs, seeds)])
        return [o.float() for o in outs] + [g.float() for g in grads]

    with qt.force_strategy("dequant"):
        for block in blocks:
            seeds = [torch.randn_like(o, dtype=torch.float32) for o in blocks[block](x)]
            want = run(block, x)  # unfused, computing in fp32
            qt.fuse(model)
            mlp = layer.mlp
            got = run(block, x.bfloat16())
            qt.unfuse(model)
            mlp = layer.mlp
            for g, w in zip(got, want):
                assert _rel(g, w) <= 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_bf16_model_with_checkpointing_and_packing(backend, device, family):
    """A whole bf16 model, gradient checkpointing on (fused) and off
    (unfused), a packed batch. Reference: the same model in fp32, unfused.
    The fused model's loss is within 1e-2 of it; its LoRA gradients are
    closer to the unfused bf16 model's than that model's are to the
    reference (bf16 through a whole model costs these tiny random models
    4-18% of their LoRA gradients, where fusing changes them by 1-2%)."""
    import copy

    from qlora_triton.finetune.data import packed_inputs

    model = _model(family, torch.bfloat16).to(device)
    ids = torch.randint(1, 53, (2, 13), device=device)
    ids[:, [3, 8]] = 0  # separators: three sequences per row
    inputs = packed_inputs(ids, 0)
    with qt.force_strategy("dequant"):
        with qt.force_backend("torch"):  # (the reference: either backend's is one)
            loss_ref, ref = _loss_and_grads(copy.deepcopy(model).float(), inputs)
        loss0, unfused = _loss_and_grads(model, inputs)
        qt.fuse(model)
        enable_checkpointing(model)
        loss1, fused = _loss_and_grads(model, inputs)
    assert abs(loss1 - loss_ref).item() <= 1e-2 * abs(loss_ref).item()
    assert abs(loss1 - loss0).item() <= 1e-2 * abs(loss0).item()
    assert _rel(_flat(fused), _flat(unfused)) < _rel(_flat(unfused), _flat(ref))


def test_packed_batch_gives_each_sequence_its_own_loss(device):
    """A packed row (transformers' position_ids format) through the fused
    model gives each sequence the logits it gets alone; without the
    position ids the later sequences would see the earlier ones. (The
    masking is transformers'; the torch backend runs the blocks here, the
    Triton kernels run packed in the bf16 model test.)"""
    from qlora_triton.finetune.data import packed_inputs

    model = qt.fuse(_model("llama").to(device))
    lengths = (5, 7, 4)
    seqs = [torch.randint(1, 53, (n,), device=device) for n in lengths]
    for s in seqs:
        s[-1] = 0  # each ends with the separator
    row = torch.cat(seqs)[None]
    inputs = packed_inputs(row, 0)
    with torch.no_grad(), qt.force_backend("torch"):
        packed = model(input_ids=row, position_ids=inputs["position_ids"], use_cache=False).logits[0]
        crossed = model(input_ids=row, use_cache=False).logits[0]
        start = 0
        for s in seqs:
            alone = model(input_ids=s[None], use_cache=False).logits[0]
            part = slice(start, start + len(s))
            assert _rel(packed[part], alone) <= 1e-5
            if start:  # the control: attention across the boundary changes them
                assert _rel(crossed[part], alone) > 1e-3
            start += len(s)


# -- structure: refusals, idempotence, unfuse ------------------------------------------
def _tiny(config_cls, model_cls, **kw):
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))


@pytest.mark.parametrize("make,found", [
    (lambda: _tiny("GPT2Config", "GPT2LMHeadModel", vocab_size=11, n_embd=16, n_layer=1, n_head=2,
                   n_positions=16), "c_attn"),
    (lambda: _tiny("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=11, hidden_size=16,
                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=32), "query_key_value"),
    (lambda: _tiny("PhiConfig", "PhiForCausalLM", vocab_size=11, hidden_size=16, num_hidden_layers=1,
                   num_attention_heads=2, intermediate_size=32), "fc1/fc2"),
])
def test_unsupported_families_are_refused(make, found):
    with pytest.raises(ValueError, match="Llama, Mistral, Qwen2, Qwen3, Gemma") as info:
        qt.fuse(make())
    assert found in str(info.value)


def test_unconverted_model_and_dropout_are_refused():
    config = transformers.LlamaConfig(**COMMON)
    with pytest.raises(ValueError, match="replace_linear"):
        qt.fuse(transformers.LlamaForCausalLM(config))
    model = transformers.LlamaForCausalLM(config)
    qt.replace_linear(model, r=2, lora_dropout=0.1, progress=False)
    with pytest.raises(ValueError, match="lora_dropout"):
        qt.fuse(model)
    with pytest.raises(TypeError, match="model"):
        qt.fuse("llama")


def test_fuse_is_idempotent_and_keeps_the_state_dict():
    model = _model("qwen2")
    before = model.state_dict()
    assert qt.fuse(model) is model
    assert qt.fuse(model) is model  # again: nothing changes
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(isinstance(m, FusedLoRAMLP) for m in model.modules()) == 1
    inputs = _batch("cpu")
    with qt.force_backend("torch"):
        fused = _loss_and_grads(model, inputs)
        qt.unfuse(model)
        assert type(model.model.layers[0].self_attn.q_proj) is qt.LoRALinear4bit
        assert type(model.model.layers[0].self_attn.o_proj) is qt.LoRALinear4bit
        assert type(model.model.layers[0].mlp).__name__ == "Qwen2MLP"
        assert model.state_dict().keys() == before.keys()
        _check(_loss_and_grads(model, inputs), fused, 1e-5)
        assert qt.unfuse(model) is model  # nothing fused: unchanged


# -- meta tensors and launch counts ----------------------------------------------------
def test_fused_model_runs_on_meta_tensors():
    """Tensor accounting runs models on the meta device through the launchers."""
    from qlora_triton.finetune.model import ModelShape
    from qlora_triton.finetune.presets import build_quantized_llama
    from qlora_triton.tensor_memory import TensorMemory

    shape = ModelShape(64, 176, 4, 2, 97, 256)
    peaks = {}
    for fused in (False, True):
        model = build_quantized_llama(shape, torch.device("meta"), r=4, alpha=8)
        enable_checkpointing(model)
        if fused:
            qt.fuse(model)
        ids = torch.zeros(1, 48, dtype=torch.long, device="meta")
        # (transformers' mask builder reads values: a ready 4-D mask skips it)
        mask = torch.ones(1, 1, 48, 48, dtype=torch.bool, device="meta").tril()
        with TensorMemory([*model.parameters(), *model.buffers()]) as meter:
            with meter.phase("step"):
                loss = model(input_ids=ids, labels=ids, attention_mask=mask, use_cache=False).loss
                loss.backward()
        assert loss.is_meta
        assert all(p.grad is not None and p.grad.is_meta for n, p in model.named_parameters() if "lora_" in n)
        peaks[fused] = meter.result()["phases"]["step"]["peak_bytes"] - meter.baseline
    assert 0 < peaks[True] <= peaks[False], peaks  # it saves fewer activations (docs/fused.md)


def test_fused_blocks_launch_at_most_half_of_unfused():
    """The Done-when count at a small width on the meta device (the op
    sequence does not depend on the width; benchmarks/launches.py)."""
    width = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4)
    fused = count_blocks("qlora_triton_fused", width, "meta", tokens=2048, r=4)
    unfused = count_blocks("qlora_triton", width, "meta", tokens=2048, r=4)
    total = lambda c: c["qkv"]["total"] + c["mlp"]["total"]  # noqa: E731
    # q/k/v + MLP: 54 launches fused against 98 unfused. The Done-when's "at most half"
    # held against the unfused layers of the time (110); since 2026-12-05 the unfused
    # LoRA layer's backward also takes its scale in the products' alpha (two launches
    # fewer per layer), so the count of each is pinned instead.
    assert (total(fused), total(unfused)) == (54, 98), (fused, unfused)
    assert fused["mlp"]["forward_ops"]["triton.gated_act_kernel"] == 1
    # o_proj alone: one cast back of the adapters' gradients instead of two
    assert fused["o_proj"]["forward"] == unfused["o_proj"]["forward"]
    assert fused["o_proj"]["backward"] == unfused["o_proj"]["backward"] - 1
    assert "aten.mul_" not in unfused["o_proj"]["backward_ops"]  # the scale rides in alpha


@pytest.mark.skipif(not _backend.INTERPRET, reason="the CPU count runs our launchers under TRITON_INTERPRET=1")
def test_whole_layer_launches_at_most_half_of_unfused():
    """The Done-when count for the whole layer (CPU tensors, kernels stubbed,
    attention on the fused sdpa kernel as on a GPU; benchmarks/launches.py):
    fused with Liger-Kernel's RMSNorm and RoPE (the GPU path) against
    unfused without, and what each part contributes. Liger's launches are
    counted through its own autograd Functions, forward and backward, and
    its patch of transformers' module does not outlive the count."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    width = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4)
    counts = {}
    for provider, liger in (("qlora_triton_fused", True), ("qlora_triton", False), ("qlora_triton", True)):
        layer = count_layer(provider, width, "cpu", tokens=2048, r=4, liger=liger)
        blocks = count_blocks(provider, width, "cpu", tokens=2048, r=4, liger=liger)
        rest = rest_of_layer(layer, blocks)  # attention and the residual adds, nothing else
        assert rest["forward_ops"] == {"aten._scaled_dot_product_flash_attention_for_cpu": 1, "aten.add": 2}
        assert rest["backward_ops"] == {"aten._scaled_dot_product_flash_attention_for_cpu_backward": 1,
                                        "aten.add": 2}
        counts[provider, liger] = layer, blocks
        assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm
    fused, unfused = counts["qlora_triton_fused", True][0], counts["qlora_triton", False][0]
    assert 2 * fused["total"] <= unfused["total"], (fused["total"], unfused["total"])
    norms_rope = counts["qlora_triton_fused", True][1]["norms_rope"]
    assert norms_rope["forward_ops"]["triton.liger.rms_norm_forward_kernel"] == 2
    assert norms_rope["forward_ops"]["triton.liger.triton_rope"] == 1
    assert norms_rope["backward_ops"]["triton.liger.rms_norm_backward_kernel"] == 2
    assert norms_rope["backward_ops"]["triton.liger.triton_rope"] == 1
