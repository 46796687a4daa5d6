"""Training a QLoRA model on several processes (gloo on the CPU): FSDP2
(``fully_shard`` per decoder layer, then the root) and DDP (``qt.wrap_ddp``)
against one process on the concatenated batch, with ``qt.PagedAdamW`` updating
local shards, adapters saved and loaded collectively, and the bytes DDP sends
in each forward counted.

Every rank builds the same tiny Llama from one seed (DDP is also given a
different one on the other ranks, which its one sync must fix); rank r trains
on rows ``[r * B, (r + 1) * B)`` of the global batch, and the loss each rank
reports is the mean over the global batch (equal token counts per rank, so the
mean of the ranks' means). The assertions hold whether the NF4 base is held in
buffers (replicated by FSDP2) or in parameters (sharded by it).
"""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_triton as qt
from qlora_triton import ddp as qt_ddp

transformers = pytest.importorskip("transformers")

SEED = 20261201  # the model's weights: the same in every process
STEPS, LR = 4, 1e-2
ROWS_PER_RANK, SEQ = 2, 7


def _tiny_llama(seed: int = SEED):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    with qt.force_backend("torch"):  # the same bytes as the Triton quantizer, without the interpreter's wait
        qt.replace_linear(model, r=4, lora_alpha=8, progress=False)
    with torch.no_grad():  # B != 0, so that A's first gradient is not zero
        for m in model.modules():
            if isinstance(m, qt.LoRALinear4bit):
                m.lora_B.weight.normal_(0.0, 0.05)
    return model


def _lora_weights(model) -> dict[str, torch.Tensor]:
    """Every adapter weight, whole (sharded ones all-gathered: every rank calls)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters() if ".lora_" in name}


def _train(model, opt, tokens: torch.Tensor, rows: slice, world: int, on_forward=None) -> list[float]:
    """STEPS steps on ``tokens[rows]`` (of ``world`` ranks); the global batch's
    mean loss per step. Plain-torch backend: the interpreted Triton optimizer
    takes seconds a step here; :func:`_triton_step_on_shards` runs it on shards."""
    losses = []
    for _ in range(STEPS):
        batch = tokens[rows]
        with qt.force_backend("torch"):
            loss = (on_forward or (lambda f: f()))(lambda: model(input_ids=batch, labels=batch).loss)
            loss.backward()
            opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def _one_process(tokens: torch.Tensor):
    model = _tiny_llama()
    opt = qt.PagedAdamW(model.parameters(), lr=LR)
    losses = _train(model, opt, tokens, slice(None), 1)
    return model, opt, losses


_REFERENCES: dict[int, tuple] = {}


def _reference(world: int):
    """(tokens, one-process model, optimizer, losses) for ``world`` ranks' global batch."""
    if world not in _REFERENCES:
        tokens = torch.randint(0, 96, (world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(world))
        _REFERENCES[world] = (tokens, *_one_process(tokens))
    return _REFERENCES[world]


def _rows(rank: int) -> slice:
    return slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)


# -- FSDP2 --------------------------------------------------------------------------------


def _fsdp_run(tokens: torch.Tensor, folder: str, other_adapter: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _tiny_llama()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and all(isinstance(p, DTensor) for p in lora.values())
    opt = qt.PagedAdamW(model.parameters(), lr=LR)  # frozen pieces included: skipped
    losses = _train(model, opt, tokens, _rows(rank), world)

    out: dict = {"losses": losses, "lora": _lora_weights(model)}
    # Moments at the local shard's shape, none for frozen parameters.
    assert set(opt.state) == set(lora.values())
    out["shard_shapes_ok"] = all(opt.state[p]["exp_avg"].shape == p.to_local().shape for p in lora.values())
    out["empty_shards"] = sum(p.to_local().numel() == 0 for p in lora.values())

    # State dict round trips: our own, torch.distributed.checkpoint's files, torch's sharded and full dicts.
    def states(o) -> dict:
        return {n: {k: t.clone() for k, t in o.state[p].items()} for n, p in lora.items()}

    before = states(opt)
    sharded = get_optimizer_state_dict(model, opt)
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    out["full_moments"] = {n: full["state"][n]["exp_avg_sq"] for n in lora}
    out["sharded_is_dtensor"] = all(isinstance(sharded["state"][n]["exp_avg"], DTensor) for n in lora)
    dcp.save({"optim": sharded}, checkpoint_id=folder + "-dcp")

    def via_dcp(o):
        loaded = {"optim": get_optimizer_state_dict(model, o)}  # the template, filled in place
        dcp.load(loaded, checkpoint_id=folder + "-dcp")
        set_optimizer_state_dict(model, o, loaded["optim"])

    roundtrips = {}
    for how, load in (("own", lambda o: o.load_state_dict(opt.state_dict())), ("dcp", via_dcp),
                      ("sharded", lambda o: set_optimizer_state_dict(model, o, sharded)),
                      ("full", lambda o: set_optimizer_state_dict(
                          model, o, full, options=StateDictOptions(full_state_dict=True)))):
        again = qt.PagedAdamW(model.parameters(), lr=0.5)
        with qt.force_backend("torch"):  # torch's loaders make the states by a step with lr=0
            load(again)
        got = states(again)
        roundtrips[how] = (all(torch.equal(got[n][k], before[n][k]) for n in lora for k in before[n])
                           and again.param_groups[0]["lr"] == LR)
    out["roundtrips"] = roundtrips

    # Adapters: save (gathered, rank 0 writes) and load another one into the shards.
    qt.save_adapter(model, folder)
    out["saved_seen_by_every_rank"] = os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    qt.load_adapter(model, other_adapter)
    out["loaded"] = _lora_weights(model)
    with torch.no_grad(), qt.force_backend("torch"):  # the forward reads what was loaded into the shards
        out["logits"] = model(input_ids=tokens[_rows(rank)]).logits
    model.reshard()  # FSDP2 keeps the root unsharded after a forward that no backward follows
    out["eight_bit"] = _eight_bit_on_shards(model, tokens[_rows(rank)], lora)
    out["triton_on_shards"] = _triton_step_on_shards(model)
    return out


def _triton_step_on_shards(model) -> bool:
    """A step of qt.PagedAdamW on the default backend (the Triton kernel,
    interpreted under TRITON_INTERPRET=1) on two sharded adapter weights (one
    with an empty shard on the third of 3 ranks) equals, shard for shard, the
    step on the whole tensors in one process."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.1.mlp.down_proj.lora_B.weight"]
    wholes = []
    for i, name in enumerate(names):
        p = params[name]
        grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))  # the same on every rank
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        wholes.append(p.full_tensor().detach().clone().requires_grad_())
        wholes[-1].grad = grad
    qt.PagedAdamW([params[n] for n in names], lr=LR).step()
    qt.PagedAdamW(wholes, lr=LR).step()
    return all(torch.equal(params[n].full_tensor(), w) for n, w in zip(names, wholes))


def _eight_bit_on_shards(model, batch: torch.Tensor, lora: dict) -> dict:
    """PagedAdamW8bit on the sharded model: each rank's shards move exactly as
    a single-process PagedAdamW8bit moves those shards given their gradients;
    its state dict round trip (re-quantized fp32 moments) stays within 8-bit rounding."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opt = qt.PagedAdamW8bit(model.parameters(), lr=LR, min_8bit_size=0)
    shadow_params = {n: p.to_local().detach().clone().requires_grad_() for n, p in lora.items()}
    shadow = qt.PagedAdamW8bit(list(shadow_params.values()), lr=LR, min_8bit_size=0)
    with qt.force_backend("torch"):
        for _ in range(2):
            model(input_ids=batch, labels=batch).loss.backward()
            for n, p in lora.items():
                shadow_params[n].grad = p.grad.to_local().clone()
            opt.step()
            shadow.step()
            opt.zero_grad()
        same = all(torch.equal(p.to_local(), shadow_params[n]) for n, p in lora.items())
        again = qt.PagedAdamW8bit(model.parameters(), lr=LR, min_8bit_size=0)
        set_optimizer_state_dict(model, again, get_optimizer_state_dict(model, opt))
    worst = 0.0
    for p in lora.values():
        for a, b in zip(opt.dequantized_moments(p), again.dequantized_moments(p)):
            if a.numel():
                worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    return {"same_as_on_shards": same, "roundtrip_rel_err": worst,
            "codes_shape_ok": all(opt.state[p]["exp_avg_codes"].shape == p.to_local().shape for p in lora.values()),
            "steps": {again.state[p]["step"].item() for p in lora.values()}}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_trains_saves_and_loads_like_one_process(world, request, tmp_path):
    from safetensors.torch import load_file

    pool = request.getfixturevalue(f"dist{world}")
    tokens, ref_model, ref_opt, ref_losses = _reference(world)
    # Another adapter, written by one process, for the ranks to load.
    other = _tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.normal_()
    qt.save_adapter(other, tmp_path / "other")

    results = pool.run(_fsdp_run, tokens, str(tmp_path / "fsdp"), str(tmp_path / "other"))
    ref_lora = _lora_weights(ref_model)
    for r in results:
        loss_diff = max(abs(a - b) for a, b in zip(r["losses"], ref_losses))
        assert loss_diff <= 1e-6, (r["losses"], ref_losses)
        assert r["lora"].keys() == ref_lora.keys()
        weight_diff = max((r["lora"][n] - ref_lora[n]).abs().max().item() for n in ref_lora)
        assert weight_diff <= 1e-5
        assert all(torch.equal(r["lora"][n], results[0]["lora"][n]) for n in ref_lora)
        assert r["shard_shapes_ok"] and r["sharded_is_dtensor"] and r["triton_on_shards"]
        assert r["roundtrips"] == {"own": True, "dcp": True, "sharded": True, "full": True}
        assert r["saved_seen_by_every_rank"]
        wanted = {n: ref_opt.state[p]["exp_avg_sq"] for n, p in ref_model.named_parameters() if ".lora_" in n}
        assert all(torch.allclose(r["full_moments"][n], wanted[n], rtol=1e-4, atol=1e-10) for n in wanted)
        other_lora = _lora_weights(other)
        assert all(torch.equal(r["loaded"][n], other_lora[n]) for n in other_lora)
    for rank, r in enumerate(results):
        with torch.no_grad(), qt.force_backend("torch"):
            logits = other(input_ids=tokens[_rows(rank)]).logits
        assert (r["logits"] - logits).abs().max() <= 1e-6
    for r in results:
        eight = r["eight_bit"]
        assert eight["same_as_on_shards"] and eight["codes_shape_ok"] and eight["steps"] == {2.0}
        assert eight["roundtrip_rel_err"] <= 0.02, eight  # one 8-bit dynamic-map step
    if world == 3:
        assert results[2]["empty_shards"] > 0  # lora_A's 4 rows in chunks of 2: the third rank has none

    # The file is exactly the one a single process writes for these weights.
    saved = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    prefix = "base_model.model."
    assert {k[len(prefix):] for k in saved} == set(ref_lora)
    assert all(torch.equal(saved[prefix + n], results[0]["lora"][n]) for n in ref_lora)
    single = _tiny_llama()
    qt.load_adapter(single, tmp_path / "fsdp")
    assert all(torch.equal(w, results[0]["lora"][n]) for n, w in _lora_weights(single).items())
    qt.save_adapter(single, tmp_path / "single")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fsdp" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()

    # ... and PEFT loads it into the plain transformers model, bit for bit.
    peft = pytest.importorskip("peft")
    torch.manual_seed(SEED)
    plain = transformers.LlamaForCausalLM(single.config)
    peft_model = peft.PeftModel.from_pretrained(plain, tmp_path / "fsdp")
    peft_lora = {n.removeprefix(prefix).replace(".default", ""): p
                 for n, p in peft_model.named_parameters() if ".lora_" in n}
    assert peft_lora.keys() == ref_lora.keys()
    assert all(torch.equal(peft_lora[n], results[0]["lora"][n]) for n in ref_lora)
    assert json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())["r"] == 4


# -- DDP ----------------------------------------------------------------------------------


class _CollectiveBytes(TorchDispatchMode):
    """Bytes of the c10d collectives issued inside the block (DDP's buffer
    broadcasts included: ProcessGroup calls go through the dispatcher), apart
    from int32 ones: DDP's bucket order, synced once in the second forward
    (``index_bytes``; a few bytes per trainable parameter, whatever the buffers)."""

    def __init__(self):
        super().__init__()
        self.bytes = self.index_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    if t.dtype == torch.int32:
                        self.index_bytes += t.nbytes
                    else:
                        self.bytes += t.nbytes
        return func(*args, **(kwargs or {}))


def _counting(per_forward: list):
    """A wrapper of forward calls that appends (bytes, index bytes) sent in each."""
    def run(forward):
        with _CollectiveBytes() as counter:
            out = forward()
        per_forward.append((counter.bytes, counter.index_bytes))
        return out
    return run


def _ddp_run(tokens: torch.Tensor, native: bool, folder: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    # The other ranks start from another model (base and adapters): the sync must fix it.
    model = _tiny_llama(SEED if rank == 0 else SEED + rank)
    with mock.patch.object(qt_ddp, "_has_forward_sync_buffers", lambda: native):
        with _CollectiveBytes() as init:
            wrapped = qt.wrap_ddp(model)
    opt = qt.PagedAdamW(wrapped.parameters(), lr=LR)
    per_forward: list[tuple[int, int]] = []
    losses = _train(wrapped, opt, tokens, _rows(rank), world, on_forward=_counting(per_forward))
    qt.save_adapter(wrapped, folder)
    out = {"losses": losses, "lora": _lora_weights(model), "per_forward": per_forward, "init_bytes": init.bytes,
           "state": {k: v.clone() for k, v in model.state_dict().items()},
           "trainable": sum(p.requires_grad for p in model.parameters())}
    if native:
        # Rank 0's failure to write, and a missing folder, raise on every rank (none waits forever).
        errors = []
        for call in (lambda: qt.save_adapter(wrapped, os.path.join(folder, "adapter_config.json")),
                     lambda: qt.load_adapter(wrapped, folder + "-missing")):
            try:
                call()
                errors.append(None)
            except OSError as e:
                errors.append(type(e).__name__)
        out["errors"] = errors
        # The counter sees DDP's default: the whole buffer set every forward.
        plain = DistributedDataParallel(_tiny_llama())
        default: list[tuple[int, int]] = []
        _counting(default)(lambda: plain(input_ids=tokens[_rows(rank)]))
        out["default_per_forward"] = default[0][0]
        out["buffer_bytes"] = sum(b.nbytes for b in plain.module.buffers())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_syncs_the_base_once_and_sends_no_bytes_per_forward(world, request, tmp_path):
    pool = request.getfixturevalue(f"dist{world}")
    tokens, ref_model, _, ref_losses = _reference(world)
    ref_lora = _lora_weights(ref_model)
    ref_state = ref_model.state_dict()
    for native in ([True, False] if world == 2 else [True]):  # torch >= 2.13's switch, and older torch's way
        results = pool.run(_ddp_run, tokens, native, str(tmp_path / f"ddp-{native}"))
        for r in results:
            assert [sent for sent, _ in r["per_forward"]] == [0] * STEPS
            assert sum(index for _, index in r["per_forward"]) <= 4 * (2 * r["trainable"] + 2)
            assert r["init_bytes"] > 0
            assert max(abs(a - b) for a, b in zip(r["losses"], ref_losses)) <= 1e-6
            assert max((r["lora"][n] - ref_lora[n]).abs().max().item() for n in ref_lora) <= 1e-5
            # Every rank's base (bitsandbytes' keys and bytes) is rank 0's, as one process built it.
            base = [k for k in ref_state if ".lora_" not in k]
            assert all(torch.equal(r["state"][k], ref_state[k]) for k in base)
        if native:
            assert all(r["default_per_forward"] >= r["buffer_bytes"] > 0 for r in results)
            assert all(r["errors"] == ["NotADirectoryError", "FileNotFoundError"] for r in results)
        saved = qt.load_adapter(_tiny_llama(), tmp_path / f"ddp-{native}")
        assert all(torch.equal(w, results[0]["lora"][n]) for n, w in _lora_weights(saved).items())


def test_wrap_ddp_refuses_the_settings_it_makes():
    with pytest.raises(ValueError, match="forward_sync_buffers"):
        qt.wrap_ddp(torch.nn.Linear(2, 2), forward_sync_buffers=True)
    with pytest.raises(ValueError, match="broadcast_buffers, init_sync"):
        qt.wrap_ddp(torch.nn.Linear(2, 2), init_sync=False, broadcast_buffers=True)
    with pytest.raises(TypeError, match="model must be"):
        qt.wrap_ddp("model")
