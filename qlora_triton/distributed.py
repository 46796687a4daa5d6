"""Several ranks with FSDP2: shard a model, load one so that each rank holds
only its share, and say how much of the NF4 base each rank keeps.

``Linear4bit`` stores its NF4 tensors as frozen non-float Parameters (see
:mod:`qlora_triton.linear`), so ``torch.distributed.fsdp.fully_shard`` shards
them like any weight and all-gathers them bit for bit in forward.

* :func:`shard_model` applies ``fully_shard`` to every decoder layer and to
  the root (a model every rank holds whole, e.g. after ``replace_linear``).
* :func:`load_sharded` builds a transformers causal LM on the meta device,
  shards it, and fills each rank's shards from a local safetensors folder,
  one tensor at a time: from an NF4 folder (ours or transformers +
  bitsandbytes) each rank reads only the rows it keeps; from a dense folder
  each rank reads and quantizes one weight at a time and keeps its rows. No
  rank ever holds the whole base or the dense model.
* :func:`base_bytes` counts the NF4 bytes this rank holds and the whole base's.
* :func:`unsharded` gathers every sharded layer for code that needs whole
  weights outside a forward (``merged_weight``, ``merge_and_unload``, export).

FSDP2 splits each tensor on dim 0 into ``torch.chunk`` pieces, so a rank holds
``ceil(rows / world)`` rows of a tensor (trailing ranks fewer, possibly none):
1/world of the base within one row per tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .convert import freeze_all_but_lora, select_linears
from .dtensor import is_dtensor, like, local
from .linear import _BNB_KEY, _QUANT_PARAMS, _QUANT_STATE_KEY, Linear4bit, LoRALinear4bit, check_lora_args
from .quantization import quantize_nf4
from .weight import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Weight, _field, check_blocksize, parse_quant_state


def _default_mesh(mesh, device_type: str | None = None):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if mesh is not None:
        if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
            raise TypeError(f"mesh must be a 1-D torch.distributed.device_mesh.DeviceMesh or None, got {mesh!r}")
        return mesh
    if not dist.is_initialized():
        raise RuntimeError("no process group: call torch.distributed.init_process_group first "
                           "(torchrun sets the environment it reads)")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules ``shard_model`` shards one by one: those whose class is in a
    transformers model's ``_no_split_modules`` (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"model: a {type(model).__name__} names no decoder layer class in _no_split_modules; "
                         "pass layers= to shard_model")
    return layers


def shard_model(model: nn.Module, mesh=None, mp_policy=None, layers: Iterable[nn.Module] | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each of ``layers`` (default: the decoder
    layers, see :func:`decoder_layers`) and then to ``model``; returns ``model``
    (now an ``FSDPModule``). Collective: every rank calls it with the same model.

    Args:
        mesh: a 1-D ``DeviceMesh`` (default: every rank of the default process
            group, on "cuda" with NCCL, else "cpu").
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (it casts
            float parameters only; the NF4 storage is integer and stays exact).
        reshard_after_forward: passed to ``fully_shard``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    mesh = _default_mesh(mesh, None if device is None or device.type == "cpu" else device.type)
    kwargs: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise TypeError(f"mp_policy must be a MixedPrecisionPolicy or None, got {type(mp_policy).__name__}")
        kwargs["mp_policy"] = mp_policy
    for layer in decoder_layers(model) if layers is None else list(layers):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m._weight_cache = ((), (), None, ())  # views of the whole tensors, now released
    return model


def base_bytes(model: nn.Module) -> dict[str, int]:
    """``{"local": NF4 bytes this rank holds, "total": the whole base's}``
    (codebooks and scales included; the same number twice when not sharded)."""
    kept = total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for p in m.nf4_parameters().values():
                part = local(p)
                kept += part.numel() * part.element_size()
                total += p.numel() * p.element_size()
    return {"local": kept, "total": total}


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Within the block every FSDP module of ``model`` holds whole parameters
    (all-gathered; resharded on exit), so ``quant_weight``,
    ``dequantized_weight``, ``merged_weight`` and ``merge_and_unload``'s reads
    work. Collective: every rank enters it."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        yield model
    finally:
        for m in reversed(fsdp):
            m.reshard()


# -- loading ------------------------------------------------------------------
class _Checkpoint:
    """The tensors of a local safetensors folder, read by rows on demand
    (``pread``: only the bytes asked for, nothing memory-mapped)."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        from .hub import safetensors_files

        files = safetensors_files(folder)
        if not files:
            raise ValueError(f"folder: {os.fspath(folder)!r} holds no safetensors weights")
        self._files: dict[str, Any] = {}
        for name in files:
            f = stack.enter_context(safe_open(folder / name, framework="pt", backend="pread"))
            self._files.update({key: f for key in f.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self):
        return self._files.keys()

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if key not in self._files:
            raise ValueError(f"the checkpoint has no {key!r}")
        part = self._files[key].get_slice(key)
        if start is not None and start >= stop:  # a trailing rank's empty share
            return part[0:1][:0]  # (safetensors refuses empty slices; one row gives the dtype)
        return part[start:stop]


def _local_range(p, rows: int) -> tuple[int, int]:
    """This rank's rows ``[start, stop)`` of a tensor of ``rows`` rows sharded as ``p``."""
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def _read_local(ckpt: _Checkpoint, key: str, p) -> torch.Tensor:
    """This rank's rows of ``key`` for the (sharded or whole) parameter ``p``."""
    if not is_dtensor(p):
        return ckpt.rows(key)
    start, stop = _local_range(p, p.shape[0])
    return ckpt.rows(key, start, stop)


def _nf4_format(ckpt: _Checkpoint, name: str) -> dict[str, Any]:
    key = f"{name}.weight{_QUANT_STATE_KEY}"
    meta = parse_quant_state(key, ckpt.rows(key))
    return dict(shape=_field(key, meta, "shape", list), dtype=_field(key, meta, "dtype", str),
                blocksize=_field(key, meta, "blocksize", int),
                blocksize2=meta.get("nested_blocksize") if "nested_blocksize" in meta else None)


def _skeleton(out_features: int, in_features: int, bias: bool, dtype: torch.dtype, blocksize: int,
              blocksize2: int | None, lora: dict[str, Any], compute_dtype) -> LoRALinear4bit:
    """A ``LoRALinear4bit`` on the meta device with the real one's shapes and format."""
    n = out_features * in_features
    nblocks = math.ceil(n / blocksize)
    f32 = dict(dtype=torch.float32)
    with torch.device("meta"):
        nested = {} if blocksize2 is None else dict(
            absmax2=torch.empty(math.ceil(nblocks / blocksize2), **f32), code2=torch.empty(256, **f32),
            offset=torch.empty((), **f32), blocksize2=blocksize2)
        qw = NF4Weight(packed=torch.empty((n + 1) // 2, dtype=torch.uint8),
                       absmax=torch.empty(nblocks, dtype=torch.uint8 if nested else torch.float32),
                       shape=(out_features, in_features), dtype=dtype, blocksize=blocksize,
                       code=torch.empty(16, **f32), **nested)
        b = torch.empty(out_features, dtype=dtype) if bias else None
        return LoRALinear4bit(qw, b, compute_dtype=compute_dtype, **lora)


def load_sharded(folder: str | os.PathLike, mesh=None, mp_policy=None, dtype: torch.dtype = torch.bfloat16,
                 target_modules=None, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, seed: int = 0, model_class: Any = None) -> nn.Module:
    """A transformers causal LM from a local safetensors ``folder``, with NF4 +
    LoRA layers, sharded by FSDP2 over ``mesh`` (see :func:`shard_model`), each
    rank materializing only its shards. Collective: every rank calls it.

    The folder is dense (each target weight is read whole, one at a time,
    quantized with ``blocksize`` / ``double_quant`` and this rank's rows kept)
    or NF4 (ours or transformers + bitsandbytes: the layers it stores in NF4
    are the targets, each read in its own format, this rank's rows only).
    Other weights (embeddings, norms, head) are read by this rank's rows and
    cast to ``dtype``. Targets and adapters are as in ``replace_linear``
    (``target_modules``, ``r``, ``lora_alpha``, ``lora_dropout``,
    ``use_rslora``, ``compute_dtype``); each ``lora_A`` is kaiming-uniform
    from a ``torch.Generator`` seeded with ``seed`` (the same on every rank,
    layer by layer in module order), ``lora_B`` zeros. Only the adapters are
    trainable. Returns the model (an ``FSDPModule``) on the mesh's device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    check_blocksize(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder: {os.fspath(folder)!r} is not a Hugging Face model folder (no config.json)")
    mesh = _default_mesh(mesh)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    model_class = AutoModelForCausalLM if model_class is None else model_class

    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(folder, stack)
        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config"):  # (bitsandbytes' or ours: the stored bytes say the format)
            del config.quantization_config
        with torch.device("meta"):
            model = model_class.from_config(config, dtype=dtype)
        stored = {k[: -len(".weight" + _QUANT_STATE_KEY)] for k in ckpt.keys()
                  if k.endswith(".weight" + _QUANT_STATE_KEY)}
        chosen, _ = select_linears(model, target_modules)
        if stored:
            chosen = {n: v for n, v in chosen.items() if n in stored}
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} matched no linear layer of the model")
        formats: dict[str, dict] = {}
        for name, (module, kind) in chosen.items():
            if kind != "linear":
                raise ValueError(f"model: {name} is a {type(module).__name__}; load_sharded takes nn.Linear layers")
            fmt = _nf4_format(ckpt, name) if name in stored else dict(
                shape=[module.out_features, module.in_features], dtype=str(dtype).removeprefix("torch."),
                blocksize=blocksize, blocksize2=NESTED_BLOCKSIZE if double_quant else None)
            if fmt["shape"] != [module.out_features, module.in_features]:
                raise ValueError(f"{name}: stored shape {fmt['shape']}, the model needs "
                                 f"[{module.out_features}, {module.in_features}]")
            layer_dtype = getattr(torch, fmt["dtype"]) if name in stored else dtype
            skeleton = _skeleton(module.out_features, module.in_features, module.bias is not None,
                                 layer_dtype, fmt["blocksize"], fmt["blocksize2"], lora, compute_dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, skeleton)
            formats[name] = fmt
        freeze_all_but_lora(model)
        shard_model(model, mesh=mesh, mp_policy=mp_policy)
        model.to_empty(device=device)
        _fill(model, ckpt, {n: n in stored for n in chosen}, dtype, device, seed)
        # Buffers were made on the meta device: those the checkpoint holds are
        # read whole (they are not sharded), the others (rotary frequencies)
        # computed again by transformers' own initializer, on modules without
        # parameters so that no loaded weight is initialized again.
        for name, m in model.named_modules():
            computed = []
            for bname in list(m._buffers):
                key = f"{name}.{bname}" if name else bname
                if key in ckpt and bname not in m._non_persistent_buffers_set:
                    m._buffers[bname] = ckpt.rows(key).to(device)
                else:
                    computed.append(key)
            if computed and m._parameters:
                raise ValueError(f"load_sharded: cannot compute the buffers {computed} of a module with "
                                 "parameters (its initializer would overwrite them)")
            if computed:
                model._init_weights(m)
    return model


def _fill(model: nn.Module, ckpt: _Checkpoint, nf4: dict[str, bool], dtype: torch.dtype,
          device: torch.device, seed: int) -> None:
    """Each rank's shards from ``ckpt``, one tensor at a time."""
    from .hf_quantizer import NF4Config, _quantize_on_host

    generator = torch.Generator().manual_seed(seed)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    done: set[int] = set()
    skip: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        skip.update(map(id, m.nf4_parameters().values()))
        if nf4[name]:
            sd = {}
            for pname, field in _QUANT_PARAMS.items():
                p = m._parameters.get(pname)
                if p is not None and field in _BNB_KEY:
                    key = f"{name}.weight{_BNB_KEY[field]}"
                    sd["weight" + _BNB_KEY[field]] = like(_read_local(ckpt, key, p).to(device), p)
            sd["weight" + _QUANT_STATE_KEY] = ckpt.rows(f"{name}.weight{_QUANT_STATE_KEY}")
            m._load_shards(sd)
        else:
            dense = ckpt.rows(f"{name}.weight").to(device=device, dtype=dtype)
            config = NF4Config(blocksize=m._blocksize, double_quant=m._double_quant)
            qw = _quantize_on_host(dense, config) if device.type == "cpu" else \
                quantize_nf4(dense, blocksize=config.blocksize, double_quant=config.double_quant)
            del dense
            m._load_shards(qw.state_dict())
            del qw
        if isinstance(m, LoRALinear4bit):
            with torch.no_grad():
                a = torch.empty(m.lora_A.weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                _set_local(m.lora_A.weight, a)
                _set_local(m.lora_B.weight, torch.zeros(m.lora_B.weight.shape))
            done.update((id(m.lora_A.weight), id(m.lora_B.weight)))
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in skip or id(p) in done:
                continue
            key = next((k for k in names[id(p)] if k in ckpt), None)
            if key is None:
                raise ValueError(f"the checkpoint holds no weight for {names[id(p)][0]}")
            local(p).copy_(_read_local(ckpt, key, p))
            done.add(id(p))


def _set_local(p, full: torch.Tensor) -> None:
    """This rank's rows of ``full`` into ``p`` (sharded or whole)."""
    if is_dtensor(p):
        start, stop = _local_range(p, p.shape[0])
        p.to_local().copy_(full[start:stop])
    else:
        p.copy_(full)
