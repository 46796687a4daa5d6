"""Model conversion: ``replace_linear`` swaps a model's linear layers for
``LoRALinear4bit`` (quantizing them one at a time), ``merge_and_unload`` turns
them back into dense ``nn.Linear`` layers holding ``W + s * B @ A``. The rules
for which modules are linear layers and which of them are targets live here and
serve the transformers quantizer too."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .linear import Linear4bit, LoRALinear4bit, _check_compute_dtype, check_lora_args
from .quantization import quantize_nf4
from .weight import FLOAT_DTYPES, NF4Weight, check_blocksize

logger = logging.getLogger("qlora_triton")


@dataclasses.dataclass
class ConversionReport:
    """What ``replace_linear`` did. ``total_params`` counts each NF4 weight at
    its dense element count (as PEFT's ``print_trainable_parameters`` does)."""

    replaced: list[str]
    trainable_params: int
    total_params: int
    already_converted: list[str] = dataclasses.field(default_factory=list)  # LoRALinear4bit, left as they were
    tied: list[str] = dataclasses.field(default_factory=list)  # matched but tied: left dense

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        kept = f" ({len(self.already_converted)} already LoRALinear4bit)" if self.already_converted else ""
        return (f"replaced {len(self.replaced)} Linear layers{kept} | trainable params: "
                f"{self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {self.trainable_percent:.4f}")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _is_bnb_4bit(module: nn.Module) -> bool:
    """A ``bitsandbytes.nn.Linear4bit`` (or its NF4/FP4 subclasses), told apart
    without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


def _is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``): it owns its
    base layer and adapters."""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft") for c in type(module).__mro__)


def linear_kind(module: nn.Module) -> str | None:
    """What ``replace_linear`` can make of ``module``: ``"lora"`` (already a
    LoRALinear4bit), ``"nf4"`` (our Linear4bit: adapters are added, no requantization),
    ``"bnb"`` (bitsandbytes' Linear4bit: its bytes are kept), ``"conv1d"``,
    ``"linear"`` (``nn.Linear`` or a subclass), or ``None``."""
    if isinstance(module, LoRALinear4bit):
        return "lora"
    if isinstance(module, Linear4bit):
        return "nf4"
    if _is_bnb_4bit(module):
        return "bnb"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{name: (module, kind)}`` of the model's linear layers (see
    :func:`linear_kind`), never looking inside one of ours, a bitsandbytes layer
    or a PEFT adapter layer (their ``lora_A`` / ``base_layer`` are theirs), and
    never taking ``nn.MultiheadAttention``'s ``out_proj`` (its owner reads the
    dense weight directly)."""
    found: dict[str, tuple[nn.Module, str]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            kind = linear_kind(child)
            if kind is not None and not isinstance(module, nn.MultiheadAttention):
                found[name] = (child, kind)
            elif not _is_adapter_layer(child) and kind is None:
                walk(child, name + ".")

    if linear_kind(model) is not None:
        raise TypeError(f"model must contain the layers to convert, got a single {type(model).__name__} "
                        "(use Linear4bit.from_linear / LoRALinear4bit.from_linear for one layer)")
    walk(model, "")
    return found


def _output_head_names(model: nn.Module, linears: dict[str, tuple[nn.Module, str]]) -> set[str]:
    """Names of the output head: ``lm_head``, the module ``get_output_embeddings()``
    returns, and any linear whose weight is tied to an embedding."""
    heads = {name for name in linears if name.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, (module, _) in linears.items():
        if out is not None and module is out:
            heads.add(name)
        if id(getattr(module, "weight", None)) in embedding_weights:
            heads.add(name)
    return heads


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_targets(target_modules) -> str | tuple[str, ...] | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: not a valid regex ({e}): {target_modules!r}") from None
        return target_modules
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError("target_modules must be a regex string or a non-empty list of module-name suffixes")
    return targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; NF4 weights count at their dense size (not their
    storage parameters' element counts)."""
    nf4 = [m for m in model.modules() if isinstance(m, Linear4bit)]
    storage = {id(p) for m in nf4 for p in m.nf4_parameters().values()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if id(p) not in storage)
    total += sum(m.in_features * m.out_features for m in nf4)
    return trainable, total


def freeze_all_but_lora(model: nn.Module) -> None:
    """Make the LoRA adapters the model's only trainable parameters."""
    lora_params = {id(p) for m in model.modules() if isinstance(m, LoRALinear4bit)
                   for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)


META_HINT = ("load it quantized instead, with no dense copy: "
             "AutoModelForCausalLM.from_pretrained(folder, quantization_config=qlora_triton.NF4Config()) "
             "or qlora_triton.from_pretrained(folder)")


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every name it has`` (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _check_target(name: str, module: nn.Module, kind: str) -> None:
    """Everything that could stop the conversion of one layer, checked before any is changed."""
    if kind in ("linear", "conv1d"):
        weight = module.weight
        if weight.is_meta:
            raise ValueError(f"model: {name}.weight is on the meta device (the model was built "
                             f"without its weights); {META_HINT}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"model: {name}.weight must be float32, float16 or bfloat16, got {weight.dtype}")
        if weight.dim() != 2 or weight.numel() == 0:
            raise ValueError(f"model: {name}.weight must be a non-empty 2-D matrix, got {tuple(weight.shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"model: {name}.weight contains NaN or Inf; NF4 cannot represent it")
    elif kind == "bnb":
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is None:
            raise ValueError(f"model: {name} is a bitsandbytes Linear4bit whose weight is not quantized "
                             "yet (move it to its device first)")
        if getattr(quant_state, "quant_type", None) != "nf4":
            raise ValueError(f"model: {name} is a bitsandbytes {getattr(quant_state, 'quant_type', None)!r} "
                             "layer; only NF4 is supported")
    elif kind == "nf4" and module.weight.is_meta:
        raise ValueError(f"model: {name} is a Linear4bit on the meta device (its weight was never loaded); "
                         f"{META_HINT}")


def quantized_base(module: nn.Module, kind: str, blocksize: int, double_quant: bool,
                   device: torch.device | str | None) -> tuple[NF4Weight, torch.Tensor | None]:
    """``(NF4 weight, bias)`` of a linear layer of any kind (see :func:`linear_kind`):
    quantized from a dense weight (a ``Conv1D``'s ``[in, out]`` weight transposed
    first), or the existing NF4 bytes of ours or bitsandbytes' (never requantized)."""
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    if kind in ("nf4", "lora"):
        qw = module.quant_weight
    elif kind == "bnb":
        qw = NF4Weight.from_bnb(module.weight.data, module.weight.quant_state)
    else:
        weight = module.weight.detach()
        if kind == "conv1d":
            weight = weight.t()
        if device is not None:
            weight = weight.to(device)
        qw = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    if device is not None:
        qw = qw.to(device)
        bias = None if bias is None else bias.to(device)
    return qw, bias


def select_linears(model: nn.Module, target_modules, default_skip: set[str] | None = None
                   ) -> tuple[dict[str, tuple[nn.Module, str]], dict[str, tuple[nn.Module, str]]]:
    """``(chosen, all)`` linear layers of ``model`` for ``target_modules`` (see
    :func:`replace_linear`); ``default_skip`` replaces the output head as what
    ``None`` leaves out."""
    targets = _check_targets(target_modules)
    linears = linear_modules(model)
    if targets is None:
        skip = _output_head_names(model, linears) if default_skip is None else default_skip
        chosen = {n: v for n, v in linears.items() if n not in skip}
    else:
        chosen = {n: v for n, v in linears.items() if _matches(n, targets)}
    return chosen, linears


def replace_linear(model: nn.Module, target_modules: str | Iterable[str] | None = None, r: int = 8,
                   lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   progress: bool = True) -> ConversionReport:
    """Swap matching linear layers of ``model`` (in place) for ``LoRALinear4bit``
    and freeze every parameter that is not a LoRA adapter.

    Linear layers are ``nn.Linear`` and its subclasses, transformers' ``Conv1D``
    (GPT-2; its ``[in, out]`` weight is transposed), our ``Linear4bit`` (a model
    loaded with ``NF4Config``: adapters are added, the NF4 bytes kept) and
    bitsandbytes' NF4 ``Linear4bit`` (its bytes kept, no dequantize). Layers
    inside our layers, bitsandbytes' or PEFT's adapter layers are never touched,
    nor ``nn.MultiheadAttention.out_proj``.

    Safe to repeat: a ``LoRALinear4bit`` is left as it is (its adapters kept), so
    a second call changes nothing and says so (a warning on "qlora_triton").
    Atomic: every target is checked (dtype, device, finite values) before any is
    changed. A target whose weight is tied to another parameter (a tied
    ``lm_head``) is left dense and tied, with a warning: quantizing it would untie
    it and keep a second dense copy. A model on the meta device (built without
    weights) is refused: load it with ``NF4Config`` instead.

    Args:
        target_modules: ``None`` (every linear layer except the output head:
            ``lm_head``, ``model.get_output_embeddings()``, or a layer tied to an
            embedding), a list of name suffixes (PEFT's rule: the full name, or a
            suffix after a dot), or a regex matched against the whole name.
        r, lora_alpha, lora_dropout, use_rslora: the adapters (see ``LoRALinear4bit``).
        blocksize, double_quant: the NF4 format of dense layers.
        compute_dtype: the layers' compute dtype (``None``: the input's).
        device: quantize on this device (default: each layer's own). Layers are
            converted one at a time and each dense weight is released as soon
            as it is replaced, so the model is never held twice.
        progress: show a tqdm bar over the layers.

    Returns a :class:`ConversionReport` (also logged at INFO on "qlora_triton").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    check_blocksize(blocksize)
    _check_compute_dtype(compute_dtype)
    chosen, linears = select_linears(model, target_modules)
    if not chosen:
        shown = list(linears)[:8]
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer in the model "
                         f"(its linear layers: {shown}{' ...' if len(linears) > 8 else ''})")

    already = [n for n, (_, kind) in chosen.items() if kind == "lora"]
    tied_names = _tied_names(model)
    tied = {}
    for name, (module, kind) in chosen.items():
        others = [t for t in tied_names.get(id(getattr(module, "weight", None)), []) if t != name + ".weight"]
        if kind != "lora" and others:
            tied[name] = others
    for name, others in tied.items():
        logger.warning("replace_linear: %s.weight is tied to %s; left it dense and tied (quantizing it "
                       "would untie it and keep a second dense copy); untie it first to quantize it",
                       name, ", ".join(others))
    todo = {n: v for n, v in chosen.items() if n not in already and n not in tied}
    if not todo and not already:
        raise ValueError(f"target_modules={target_modules!r}: every matched layer is tied to another "
                         f"parameter ({sorted(tied)}); nothing to convert")
    for name, (module, kind) in todo.items():
        _check_target(name, module, kind)

    for name in tqdm(list(todo), desc="qlora_triton: quantizing", unit="layer", disable=not progress):
        module, kind = todo.pop(name)
        qw, bias = quantized_base(module, kind, blocksize, double_quant, device)
        # A quantized layer keeps its own compute dtype unless one is given.
        own = getattr(module, "compute_dtype", None) if kind in ("nf4", "bnb") else None
        new = LoRALinear4bit(qw, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             use_rslora=use_rslora,
                             compute_dtype=compute_dtype or (own if own in FLOAT_DTYPES else None))
        parent_name, _, child = name.rpartition(".")
        del module, qw, bias
        setattr(model.get_submodule(parent_name), child, new)  # drops the last reference to the old layer
        del new

    freeze_all_but_lora(model)
    record_quantization_config(model, blocksize, double_quant, compute_dtype)
    trainable, total = count_parameters(model)
    report = ConversionReport(replaced=[n for n in chosen if n not in already and n not in tied],
                              trainable_params=trainable, total_params=total,
                              already_converted=already, tied=sorted(tied))
    if already and not report.replaced:
        logger.warning("replace_linear: nothing to do: the %d matched layers are already LoRALinear4bit "
                       "(their adapters are kept)", len(already))
    logger.info("%s", report)
    return report


def lora_settings(model: nn.Module) -> dict | None:
    """The LoRA settings of ``model``'s ``LoRALinear4bit`` layers as ``NF4Config``
    records them: the most common ``{r, lora_alpha, lora_dropout, use_rslora}``,
    and those of the layers that differ under ``"layers"``; ``None`` without any."""
    keys = ("r", "lora_alpha", "lora_dropout", "use_rslora")
    layers = {n: (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora)
              for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}
    if not layers:
        return None
    common = Counter(layers.values()).most_common(1)[0][0]
    out: dict = dict(zip(keys, common))
    others = {n: dict(zip(keys, v)) for n, v in layers.items() if v != common}
    if others:
        out["layers"] = others
    return out


def record_quantization_config(model: nn.Module, blocksize: int, double_quant: bool,
                               compute_dtype: torch.dtype | None) -> None:
    """Give a transformers model converted by ``replace_linear`` the
    ``quantization_config`` (an ``NF4Config`` with its LoRA settings) that
    makes ``save_pretrained`` / ``Trainer.save_model`` write a folder that
    ``from_pretrained`` loads back (layers and adapters). Other models (no
    transformers config) are left alone; transformers is never imported here."""
    config = getattr(model, "config", None)
    if config is None or not type(config).__module__.startswith("transformers"):
        return
    from .hf_quantizer import QUANT_METHOD, NF4Config

    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant is None:
        new = NF4Config(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    elif quant.get("quant_method") == QUANT_METHOD:
        new = NF4Config(**{k: v for k, v in quant.items() if k != "lora"})
    elif quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit"):
        new = NF4Config.from_bnb(quant)  # its layers are ours now, the bytes still bitsandbytes'
    else:
        logger.warning("replace_linear: the model's quantization_config (%s) is not one qlora_triton "
                       "writes; save_pretrained may write a folder that does not reload",
                       quant.get("quant_method"))
        return
    new.lora = lora_settings(model)
    new.track(model)
    config.quantization_config = new


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear4bit`` by a dense ``nn.Linear`` holding
    ``W + s * B @ A`` and every ``Linear4bit`` by one holding the dequantized
    ``W`` (in the dtype the weight was quantized from, on its device), one
    layer at a time; returns ``model`` (changed in place). The new weights are
    frozen (``requires_grad=False``), like the base they come from."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, Linear4bit):
        return _dense(model)
    names = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _dense(getattr(parent, child)))
    _refresh_lora_config(model)
    return model


def merge_adapter(model: nn.Module, dense: bool = True, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Merge each ``LoRALinear4bit``'s adapter into its weight, in place; returns ``model``.

    ``W + s * B @ A`` is computed in float32 from the dequantized NF4 base, then:

    - ``dense=True``: the layer becomes an ``nn.Linear`` holding it in ``dtype``
      (default float32: the merged model computes what the adapter model
      computes, to float32 rounding; ``None``: the dtype the base was quantized
      from, which rounds the merged weight once more, e.g. to bf16).
    - ``dense=False``: the layer becomes a ``Linear4bit`` holding it requantized
      to NF4 (the base's blocksize and double quantization): the memory of the
      base, but the merged weight moves by NF4's rounding (as PEFT's merge of a
      4-bit layer); ``dtype`` must be ``None`` or float32 here.

    To keep outputs exactly, keep the adapter unmerged (``save_adapter``), or
    merge densely. docs/recipes.md gives the measured errors. Plain
    ``Linear4bit`` layers (no adapter) are left as they are. Frozen like the base.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dense, bool):
        raise TypeError(f"dense must be a bool, got {type(dense).__name__}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be None, float32, float16 or bfloat16, got {dtype!r}")
    if not dense and dtype not in (None, torch.float32):
        raise ValueError(f"dtype: with dense=False the merged weight is NF4; dtype must be None, got {dtype}")
    if isinstance(model, LoRALinear4bit):
        return _dense(model, dtype) if dense else merged_nf4(model)
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear4bit)]
    if not names:
        raise ValueError("model has no LoRALinear4bit layers: nothing to merge")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        setattr(parent, child, _dense(layer, dtype) if dense else merged_nf4(layer))
    _refresh_lora_config(model)
    return model


def merged_nf4(layer: LoRALinear4bit, double_quant: bool | None = None) -> Linear4bit:
    """A frozen ``Linear4bit`` holding ``layer``'s merged weight requantized to
    NF4 (quantized from float32; ``dtype`` stays the base's)."""
    qw = layer.quant_weight
    with torch.no_grad():
        merged = layer.merged_weight(torch.float32)
        new = quantize_nf4(merged, blocksize=qw.blocksize,
                           double_quant=qw.double_quant if double_quant is None else double_quant)
    new = dataclasses.replace(new, dtype=qw.dtype)
    bias = None if layer.bias is None else layer.bias.detach()
    return Linear4bit(new, bias, compute_dtype=layer.compute_dtype)


def _refresh_lora_config(model: nn.Module) -> None:
    """After a merge: the LoRA settings a transformers model's ``NF4Config`` records."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    if quant is None or not hasattr(quant, "lora"):
        return
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        del config.quantization_config  # every layer is dense again: a plain model
    else:
        quant.lora = lora_settings(model)


def _dense(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    with torch.no_grad():
        if isinstance(layer, LoRALinear4bit):
            weight = layer.merged_weight(dtype)
        else:
            weight = layer.dequantized_weight(dtype)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(weight.dtype, copy=True), requires_grad=False)
    return dense
