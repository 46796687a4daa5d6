"""FSDP2 over the NF4 storage, 2 and 3 processes (gloo on the CPU, NCCL on
GPUs): sharded bytes, logits, state dicts (torch's get/set_model_state_dict
and DCP), mixed precision, the error outside a forward, and the loader that
materializes only each rank's shards.

The byte rule checked: FSDP2 cuts each tensor on dim 0 into ``torch.chunk``
pieces, so a rank holds ``ceil(rows / world)`` rows of it (trailing ranks
fewer), and ``|local - total / world|`` is at most one row per tensor.

The one-process reference is the same model in the same process, before
sharding: the kernels and inputs are identical, so logits must be bitwise
equal (tolerance 0), in float32 and under a bf16 MixedPrecisionPolicy (whose
one-process twin is the model with its float parameters cast to bf16 and its
buffers left fp32: FSDP2 casts the same fp32 parameter values to bf16 before
gathering them, and no buffer).

Each pool task runs several checks and returns facts; the asserts are here.
The tasks run the ops on the plain-torch backend: they test the storage and
its collectives, the kernels are tested elsewhere (under TRITON_INTERPRET=1
the interpreter would make these minutes long).
"""

from __future__ import annotations

import json
import math
import tempfile

import pytest
import torch

import qlora_triton as qt
from qlora_triton import distributed as qtd

pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, VOCAB, R = 128, 344, 2, 32, 4


def tiny_llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def converted(seed: int):
    """A tiny Llama with NF4 + LoRA layers whose adapters are not zero."""
    model = tiny_llama(seed)
    qt.replace_linear(model, r=R, progress=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qt.LoRALinear4bit):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def input_ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def scramble(model) -> None:
    """Overwrite every local shard (NF4 bytes, scales, adapters, norms) with other values."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.is_floating_point():
                local.copy_(torch.rand(local.shape, generator=g))
            else:
                local.copy_(torch.randint(0, 100, local.shape, generator=g).to(local.dtype))


def row_bytes(p) -> int:
    return p.element_size() * (p[0].numel() if p.dim() > 1 else 1)


# -- tasks run on every rank ------------------------------------------------------
def on_torch_backend(fn):
    import functools

    @functools.wraps(fn)
    def run(*args):
        with qt.force_backend("torch"):
            return fn(*args)
    return run


@on_torch_backend
def fsdp_checks(ckpt_dir: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.tensor import DTensor

    world, rank = dist.get_world_size(), dist.get_rank()
    model = converted(seed=5)
    ids = input_ids(6)
    ref_logits = model(ids).logits
    ref_logits.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    ref_logits = ref_logits.detach()
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}  # the one-process state dict
    # torch's state-dict API without FSDP (it failed on "weight.absmax" before)
    plain_full = full_state(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    ref_merged = q_proj.merged_weight()

    qtd.shard_model(model)
    out: dict = {"plain_dsd_equal": same_state(plain_full, ref_sd)}
    out["bytes"] = qtd.base_bytes(model)
    params = [p for m in model.modules() if isinstance(m, qt.Linear4bit) for p in m.nf4_parameters().values()]
    out["all_dtensor"] = all(isinstance(p, DTensor) for p in params)
    out["rows_rule"] = all(p.to_local().shape[0] == max(0, min(p.shape[0], (rank + 1) * math.ceil(p.shape[0] / world))
                                                          - rank * math.ceil(p.shape[0] / world))
                           for p in params)
    out["row_slack"] = sum(row_bytes(p) for p in params)
    logits = model(ids).logits
    out["logits_equal"] = torch.equal(logits.detach(), ref_logits)
    # LoRA grads: every rank ran the same batch, so FSDP2's averaging
    # reduce-scatter returns the one-process grad within its rounding (sum / world)
    logits.float().pow(2).mean().backward()
    out["grad_err"] = max(float(((p.grad.full_tensor() - ref_grads[n]).abs() / ref_grads[n].abs().clamp_min(1e-12)).max())
                          for n, p in model.named_parameters() if n in ref_grads)  # (new Parameter objects)
    out["grads_on_lora_only"] = all((p.grad is not None) == p.requires_grad for p in model.parameters())
    model.zero_grad(set_to_none=True)

    try:
        q_proj.merged_weight()
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    with qtd.unsharded(model):
        out["merged_equal"] = torch.equal(q_proj.merged_weight(), ref_merged)
    out["resharded"] = isinstance(q_proj.weight, DTensor)

    # loading into a sharded layer checks what it loads (nothing is copied then)
    prefix = "model.layers.0.self_attn.q_proj."
    layer_sd = {k[len(prefix):]: v for k, v in ref_sd.items() if k.startswith(prefix + "weight")}
    nan = dict(layer_sd, **{"weight.nested_absmax": layer_sd["weight.nested_absmax"].clone().fill_(math.nan)})
    other = qt.quantize_nf4(ref_merged, blocksize=128).state_dict("weight")
    out["bad_loads"] = []
    for bad in (nan, other):
        try:
            q_proj.load_state_dict(bad, strict=False)
            out["bad_loads"].append(None)
        except RuntimeError as e:
            out["bad_loads"].append(str(e))

    # full state dict: exactly the one-process one (bitsandbytes keys and bytes)
    out["full_equal"] = same_state(full_state(model), ref_sd)
    sharded = get_model_state_dict(model)
    out["sharded_keys"] = sorted(k for k, v in sharded.items() if isinstance(v, DTensor)) \
        == sorted(k for k in ref_sd if not k.endswith("quant_state.bitsandbytes__nf4"))
    out["sharded_dtypes"] = all(sharded[k].dtype == ref_sd[k].dtype for k in ref_sd)

    # DCP: save sharded, scramble, load, set
    dcp.save(sharded, checkpoint_id=ckpt_dir)
    scramble(model)
    out["scrambled_differs"] = not torch.equal(model(ids).logits, ref_logits)  # (no stale cached view)
    target = get_model_state_dict(model)
    dcp.load(target, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, target)
    out["dcp_equal"] = same_state(full_state(model), ref_sd) and torch.equal(model(ids).logits, ref_logits)

    # set_model_state_dict from a full and from a sharded state dict
    keep = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in get_model_state_dict(model).items()}
    scramble(model)
    set_model_state_dict(model, dict(ref_sd), options=StateDictOptions(full_state_dict=True))  # (it edits the dict)
    out["set_full_equal"] = same_state(full_state(model), ref_sd) and torch.equal(model(ids).logits, ref_logits)
    scramble(model)
    set_model_state_dict(model, keep)
    out["set_sharded_equal"] = same_state(full_state(model), ref_sd) and torch.equal(model(ids).logits, ref_logits)
    return out


@on_torch_backend
def bf16_checks() -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = converted(seed=7)
    ids = input_ids(8)
    twin = converted(seed=7)  # the one-process bf16 run: float parameters in bf16 (buffers stay fp32, as under FSDP2)
    for p in twin.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    ref_logits = twin(ids).logits.detach()
    ref_nf4 = {k: v.clone() for k, v in model.state_dict().items() if ".weight" in k and "lora" not in k}
    seen: list[bool] = []  # the NF4 bytes the layers compute with, inside each forward

    def hook(module, args):
        seen.append(all(torch.equal(p, twin_params[module][n]) for n, p in module.nf4_parameters().items()))

    twin_params = {}
    for m, t in zip(model.modules(), twin.modules()):
        if isinstance(m, qt.Linear4bit):
            twin_params[m] = {n: p.detach().clone() for n, p in t.nf4_parameters().items()}
            m.register_forward_pre_hook(hook)
    qtd.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    logits = model(ids).logits.detach()
    after = {k: v for k, v in full_state(model).items() if k in ref_nf4}
    return {"logits_dtype": str(logits.dtype), "max_diff": float((logits.float() - ref_logits.float()).abs().max()),
            "nf4_seen_exact": bool(seen) and all(seen), "layers_seen": len(seen),
            "nf4_after_exact": same_state(after, ref_nf4)}


def tensor_peak_bytes(fn):
    """``(fn(), peak bytes of CPU tensors allocated while it ran)``, from the
    profiler's allocation and free events (their running sum)."""
    import os

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    live = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if e["args"].get("Device Type", 0) == 0:
            live += e["args"]["Bytes"]
            peak = max(peak, live)
    return result, peak


@on_torch_backend
def loader_checks(folder: str, reference_folder: str) -> dict:
    from torch.distributed.tensor import DTensor

    model, peak = tensor_peak_bytes(lambda: qtd.load_sharded(folder, dtype=torch.float32, r=R, seed=3))
    sd = full_state(model)
    # the one-process model of the same bytes, with the loaded adapters
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_folder, quantization_config=qt.NF4Config(),
                                               dtype=torch.float32) \
        if folder == reference_folder else qt.from_pretrained(reference_folder, dtype=torch.float32)
    qt.replace_linear(ref, r=R, progress=False)
    ref.load_state_dict({k: v for k, v in sd.items() if "lora_" in k}, strict=False)
    ref_sd = ref.state_dict()
    ids = input_ids(9)
    layer = model.model.layers[0].mlp.down_proj
    return {"bytes": qtd.base_bytes(model), "peak": peak, "state_equal": same_state(sd, ref_sd),
            "logits_equal": torch.equal(model(ids).logits, ref.eval()(ids).logits),
            "sharded": isinstance(layer.weight, DTensor),
            "lora_a_nonzero": bool(sd["model.layers.0.mlp.down_proj.lora_A.weight"].abs().sum() > 0),
            "trainable": sorted({k.rsplit(".", 2)[-2] for k, p in model.named_parameters() if p.requires_grad})}


# -- the tests --------------------------------------------------------------------
def _pool(request, world):
    return request.getfixturevalue(f"dist{world}")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_shards_the_nf4_base_exactly(request, world, tmp_path):
    results = _pool(request, world).run(fsdp_checks, str(tmp_path / "dcp"))
    total = results[0]["bytes"]["total"]
    assert sum(r["bytes"]["local"] for r in results) == total
    for r in results:
        assert r["all_dtensor"] and r["rows_rule"]
        assert abs(r["bytes"]["local"] - total / world) <= r["row_slack"], (r["bytes"], r["row_slack"])
        assert r["plain_dsd_equal"] and r["logits_equal"]
        assert r["grads_on_lora_only"] and r["grad_err"] <= 1e-6, r["grad_err"]
        assert r["error"] is not None and "unshard" in r["error"] and "FSDP2" in r["error"]
        assert r["merged_equal"] and r["resharded"]
        nan, other = r["bad_loads"]
        assert nan is not None and "NaN or Inf" in nan
        assert other is not None and "its own format" in other
        assert r["full_equal"] and r["sharded_keys"] and r["sharded_dtypes"]
        assert r["scrambled_differs"] and r["dcp_equal"]
        assert r["set_full_equal"]
        assert r["set_sharded_equal"]


def test_bf16_mixed_precision_keeps_the_nf4_bytes(dist2):
    for r in dist2.run(bf16_checks):
        assert r["logits_dtype"] == "torch.bfloat16"
        assert r["max_diff"] == 0.0  # same bf16 values, same kernels: bitwise
        assert r["nf4_seen_exact"] and r["layers_seen"] == 7 * LAYERS
        assert r["nf4_after_exact"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense tiny Llama folder and its NF4 twin (saved by our quantizer)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    dense = tiny_llama(11)
    dense.save_pretrained(root / "dense")
    nf4 = AutoModelForCausalLM.from_pretrained(root / "dense", quantization_config=qt.NF4Config(),
                                               dtype=torch.float32)
    nf4.save_pretrained(root / "nf4")
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    return str(root / "dense"), str(root / "nf4"), dense_bytes


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("source", ["nf4", "dense"])
def test_loader_keeps_only_each_ranks_share(request, folders, world, source):
    # peak: tensor bytes allocated on the CPU during load_sharded (the profiler's events)
    dense, nf4, dense_bytes = folders
    folder = nf4 if source == "nf4" else dense
    results = _pool(request, world).run(loader_checks, folder, dense if source == "dense" else nf4)
    total = results[0]["bytes"]["total"]
    for r in results:
        assert r["sharded"] and r["state_equal"] and r["logits_equal"] and r["lora_a_nonzero"]
        assert r["trainable"] == ["lora_A", "lora_B"]
        assert r["bytes"]["local"] <= total / world + 64 * 7 * LAYERS
        # never the whole base, never the dense model
        # Never the dense model; from NF4 bytes (each rank reads its rows) never
        # the whole base either. From a dense folder a rank quantizes one whole
        # weight at a time: at this tiny size that weight's quantizer
        # temporaries (~20 bytes per element) outweigh the whole base.
        assert 0 < r["peak"] < dense_bytes, (r["peak"], dense_bytes)
        if source == "nf4":
            assert r["peak"] < total, (r["peak"], total)


def test_torch_state_dict_api_without_fsdp():
    # get/set_model_state_dict walk each key with getattr: "weight.absmax" used
    # to fail; a plain model round-trips in bitsandbytes' keys and bytes.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    src, dst = converted(seed=21), converted(seed=22)
    sd = get_model_state_dict(src)
    assert same_state({k: v.detach() for k, v in sd.items()}, src.state_dict())
    assert any(k.endswith("weight.quant_state.bitsandbytes__nf4") for k in sd)
    set_model_state_dict(dst, dict(sd))
    assert same_state(dst.state_dict(), src.state_dict())
    ids = input_ids(23)
    with qt.force_backend("torch"):
        assert torch.equal(dst(ids).logits, src(ids).logits)
