"""``fuse(model)`` / ``unfuse(model)``: the decoder blocks' MLP, q/k/v and
output projection as fused autograd Functions, found by the model's structure,
not its class names.

A model is supported when it has attention blocks (modules with ``q_proj``,
``k_proj``, ``v_proj`` children) and, as many, gated MLPs (modules whose
children are exactly ``gate_proj``, ``up_proj``, ``down_proj`` and an
``act_fn`` that computes SiLU or GELU with the tanh approximation: told by
evaluating it, since its class differs across transformers versions). That is
Llama, Mistral, Qwen2, Qwen3 and Gemma (and anything built like them). The
projections must be ours (``LoRALinear4bit`` or ``Linear4bit``: convert with
``qt.replace_linear`` or ``qt.from_pretrained`` first), share their input
size and compute dtype, and have ``lora_dropout == 0``. Other models are
refused with a ``ValueError`` that says what was found (GPT-2's fused
``c_attn``, GPT-NeoX's ``query_key_value``, Phi's ungated ``fc1``/``fc2`` MLP ...).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..linear import Linear4bit, LoRALinear4bit
from .modules import FUSED_CLASS, FusedLoRAMLP, FusedSingleLoRALinear4bit, QKVGroup
from .ops import GELU_TANH, SILU, gated_act_reference

logger = logging.getLogger("qlora_triton")

SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma"
_QKV = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_OUT = "o_proj"  # the attention block's output projection: fused alone (fused/single.py)
# Names other families give their fused or ungated projections: said in the refusal.
_OTHER_LAYOUTS = {
    "c_attn": "a fused c_attn projection (GPT-2 style Conv1D)",
    "query_key_value": "a fused query_key_value projection (GPT-NeoX, Falcon, BLOOM style)",
    "qkv_proj": "a fused qkv_proj projection (Phi-3 style)",
    "Wqkv": "a fused Wqkv projection (MPT / Phi-1 style)",
    "gate_up_proj": "a fused gate_up_proj projection (Phi-3 style)",
    "fc1": "an ungated fc1/fc2 MLP (Phi, OPT, GPT style)",
    "c_fc": "an ungated c_fc/c_proj MLP (GPT-2 style)",
    "dense_h_to_4h": "an ungated dense_h_to_4h MLP (GPT-NeoX style)",
}


def _activation_kind(act: nn.Module) -> int | None:
    """SILU or GELU_TANH if ``act`` computes it (within fp32 rounding), else None."""
    if not callable(act) or (isinstance(act, nn.Module) and any(True for _ in act.parameters())):
        return None
    probe = torch.linspace(-6.0, 6.0, 49, dtype=torch.float32)
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception:  # noqa: BLE001 - an activation that cannot run on a CPU tensor is not ours to fuse
        return None
    if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
        return None
    both = torch.cat((probe, torch.ones_like(probe)))  # up = 1: act(gate) itself
    for kind in (SILU, GELU_TANH):
        want = gated_act_reference(both.view(1, -1), kind).view(-1)
        if torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
            return kind
    return None


def _is_ours(module) -> bool:
    return type(module) in (LoRALinear4bit, Linear4bit)


def _group_problem(name: str, layers: list[nn.Module]) -> str | None:
    """Why the projections ``layers`` of block ``name`` cannot be fused (None: they can)."""
    dense = [type(m).__name__ for m in layers if not _is_ours(m)]
    if dense:
        return (f"{name}: its projections are {dense}, not qlora_triton layers (convert the model with "
                "qt.replace_linear or qt.from_pretrained first)")
    if len({m.compute_dtype for m in layers}) != 1:
        return f"{name}: its projections differ in compute_dtype"
    if len({m.in_features for m in layers[:2]}) != 1 or len({m.in_features for m in layers[:3]}) == 3:
        return f"{name}: the projections that read the block's input differ in in_features"
    if any(getattr(m, "lora_dropout", 0.0) > 0 for m in layers):
        return (f"{name}: lora_dropout > 0, which the fused blocks do not support (each projection "
                "would need its own dropout mask); use lora_dropout=0 or leave the model unfused")
    if len({m.weight.device for m in layers}) != 1:
        return f"{name}: its projections are on different devices"
    return None


def _single_fusable(module) -> bool:
    """Whether an attention block's ``o_proj`` runs as a fused single
    projection: a ``LoRALinear4bit`` without dropout (a ``Linear4bit`` has no
    adapter to fuse with; a dense or dropout layer stays as it is)."""
    return type(module) is LoRALinear4bit and module.lora_dropout == 0


def _find(model: nn.Module):
    """``(mlps, attentions, singles, problems, (n_mlp, n_attention))``: gated
    MLPs to fuse as (parent, attribute, module, act), attention blocks to fuse
    as (name, q, k, v), output projections to fuse alone, why others cannot
    be fused, and how many MLPs and attention blocks the model has (fused
    already, to fuse, or not fusable)."""
    mlps, attentions, singles, problems, n_mlp, n_attention = [], [], [], [], 0, 0
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if isinstance(module, FusedLoRAMLP):
            n_mlp += 1
            continue
        if all(n in children for n in _MLP):
            n_mlp += 1
            extra = sorted(set(children) - set(_MLP) - {"act_fn"})
            act = _activation_kind(getattr(module, "act_fn", None)) if "act_fn" in children or hasattr(
                module, "act_fn") else None
            if extra or any(True for _ in module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
                problems.append(f"{name}: the MLP has more than gate_proj/up_proj/down_proj/act_fn ({extra})")
            elif act is None:
                problems.append(f"{name}: the MLP's act_fn ({type(getattr(module, 'act_fn', None)).__name__}) "
                                "is neither SiLU nor GELU (tanh approximation)")
            else:
                layers = [children[n] for n in _MLP]
                problem = _group_problem(name, layers)
                if problem is None and layers[2].in_features != layers[0].out_features:
                    problem = f"{name}: down_proj's in_features differ from gate_proj's out_features"
                if problem is None and layers[0].out_features != layers[1].out_features:
                    problem = f"{name}: gate_proj and up_proj differ in out_features"
                if problem:
                    problems.append(problem)
                elif name:  # (a bare MLP as the model: nothing to put it into)
                    parent, _, attr = name.rpartition(".")
                    mlps.append((model.get_submodule(parent), attr, module, act))
        if all(n in children for n in _QKV):
            n_attention += 1
            if _single_fusable(children.get(_OUT)):
                singles.append(children[_OUT])
            layers = [children[n] for n in _QKV]
            if all(type(m) in FUSED_CLASS.values() for m in layers):
                continue  # fused already
            problem = _group_problem(name, layers)
            if problem:
                problems.append(problem)
            else:
                attentions.append((name, *layers))
    return mlps, attentions, singles, problems, (n_mlp, n_attention)


def _refusal(model: nn.Module, reason: str) -> ValueError:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    seen = [what for key, what in _OTHER_LAYOUTS.items() if key in names]
    found = f" This model has {'; '.join(seen)}." if seen else ""
    return ValueError(f"qt.fuse: {reason}.{found} Fused blocks support decoder layers with q_proj/k_proj/"
                      f"v_proj attention and a gated MLP (gate_proj/up_proj/down_proj, SiLU or GELU-tanh): "
                      f"{SUPPORTED}.")


def fuse(model: nn.Module) -> nn.Module:
    """Run the decoder blocks of ``model`` through fused autograd Functions, in
    place: each gated MLP as one (:mod:`qlora_triton.fused.mlp`), each
    attention block's q, k and v as one (:mod:`qlora_triton.fused.qkv`), and
    its ``o_proj``, where it is a ``LoRALinear4bit`` without dropout, as one
    with the fewest ops (:mod:`qlora_triton.fused.single`).
    Parameters, their names, the state dict and the adapters stay as they
    are; :func:`unfuse` undoes it. Idempotent: blocks fused already are kept.

    Raises ``ValueError`` for a model that is not built like the supported
    families (the message says what was found), for projections that are
    not qlora_triton layers, and for ``lora_dropout > 0``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mlps, attentions, singles, problems, counts = _find(model)
    total_mlp, total_attn = counts
    if total_mlp == 0 or total_attn == 0:  # the layout first, then what is wrong inside it
        missing = "gated MLP (gate_proj/up_proj/down_proj)" if total_mlp == 0 else \
            "attention block with q_proj/k_proj/v_proj"
        raise _refusal(model, f"no {missing} found")
    if total_mlp != total_attn:
        raise _refusal(model, f"{total_attn} attention blocks but {total_mlp} gated MLPs: not a decoder "
                              "stack of the supported layout")
    if problems:
        shown = "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        raise _refusal(model, f"cannot fuse {shown}")
    for parent, attr, module, act in mlps:
        setattr(parent, attr, FusedLoRAMLP(module, act))
    for _, q, k, v in attentions:
        group = QKVGroup(q, k, v)
        for m in (q, k, v):
            m.__class__ = FUSED_CLASS[type(m)]
            m._qkv_group = group
    for m in singles:
        m.__class__ = FusedSingleLoRALinear4bit
    if mlps or attentions or singles:
        logger.info("qt.fuse: fused %d MLPs, %d q/k/v blocks and %d output projections", len(mlps),
                    len(attentions), len(singles))
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse` in place (a model never fused is returned unchanged). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedLoRAMLP):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.unfused())
    for module in model.modules():
        group = module.__dict__.get("_qkv_group")
        if group is not None and type(module) in FUSED_CLASS.values():
            module.__class__ = next(c for c, f in FUSED_CLASS.items() if f is type(module))
            del module._qkv_group
        elif type(module) is FusedSingleLoRALinear4bit:
            module.__class__ = LoRALinear4bit
    return model
