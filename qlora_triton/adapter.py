"""LoRA adapters in PEFT's file format (``adapter_config.json`` +
``adapter_model.safetensors``), readable by ``peft.PeftModel.from_pretrained``.

Keys are ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``, where ``<module path>`` is the layer's name
in the model given to ``save_adapter`` (PEFT wraps that model as
``base_model.model``).

Several processes (``torch.distributed`` initialized with more than one
rank): both functions are collective, so every rank must call them, in the
same order; a rank that does not leaves the others waiting until the process
group's timeout (nothing cheaper can tell). ``save_adapter`` gathers sharded
(FSDP2 ``DTensor``) adapter weights on every rank, rank 0 writes, and every
rank returns once the folder is complete (or raises rank 0's error).
``load_adapter`` reads on rank 0 only (the folder need not be on a shared file
system), sends the tensors to every rank and copies each rank's part into its
shard; an error in the file is raised on every rank. A ``DistributedDataParallel``
wrapper may be passed for its module. The file is the one a single process
writes for the same weights, byte for byte.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dtensor import is_dtensor
from .linear import Linear4bit, LoRALinear4bit, check_lora_args

logger = logging.getLogger("qlora_triton")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (whose ``module.``
    prefix is no part of the adapter's keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded weight is all-gathered (every rank must call)."""
    return t.full_tensor() if is_dtensor(t) else t


def _on_rank0(fn):
    """``fn()`` on rank 0, its result (or its exception) on every rank: one
    broadcast, which is also the barrier the other ranks wait on."""
    if not _distributed():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear4bit)}
    if not layers:
        raise ValueError("model has no LoRALinear4bit layers (call qlora_triton.replace_linear first)")
    return layers


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short suffixes (``["q_proj", "v_proj"]``) when they pick exactly our
    layers among the model's linear layers, else the full module paths."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))]
    picked = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if picked == set(names) else sorted(names)


# transformers head class-name endings -> PEFT's TaskType
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
               ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))


def model_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its head class
    (``LlamaForCausalLM`` -> ``"CAUSAL_LM"``); ``None`` when unknown (an encoder
    such as ``BertModel``: PEFT then loads the adapter into a plain ``PeftModel``)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def model_name_or_path(model: nn.Module) -> str | None:
    """The folder (or hub name) a transformers model was loaded from, if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return os.fspath(name) if name else None


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = "auto") -> None:
    """Write the LoRA adapters of ``model`` to directory ``path`` in PEFT's format.

    ``base_model_name_or_path`` defaults to the folder the model was loaded from
    (``model.config._name_or_path``), ``task_type`` (``"auto"``) to the one of
    its head (:func:`model_task_type`, ``None`` when unknown).

    Every ``LoRALinear4bit`` must share ``r``, ``lora_alpha``, ``lora_dropout``
    and ``use_rslora`` (one PEFT ``LoraConfig``); otherwise a ``ValueError``.
    With several processes every rank must call it (see the module docstring).
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    layers = _lora_layers(model)
    settings = {(m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"model: LoRA layers differ in (r, lora_alpha, lora_dropout, use_rslora): "
                         f"{sorted(settings)}; one PEFT adapter needs one setting")
    r, lora_alpha, lora_dropout, use_rslora = settings.pop()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": model_task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path or model_name_or_path(model),
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "use_rslora": use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = _full(getattr(m, part).weight.detach())
            tensors[f"{KEY_PREFIX}{name}.{part}.weight"] = weight.to("cpu").contiguous()
    def write(folder: str) -> None:
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})

    _on_rank0(lambda: _replace_folder(os.fspath(path), write, (CONFIG_NAME, WEIGHTS_NAME)))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter from directory ``path`` into the
    ``LoRALinear4bit`` layers of ``model`` (in place; returns ``model``).

    The file must hold ``lora_A`` and ``lora_B`` for exactly the model's LoRA
    layers, with matching shapes; anything else is a ``ValueError`` that names
    the offending keys (a rank other than the model's included: convert the
    model with the adapter's ``r``). A tensor that is not floating point is a
    ``TypeError``, and one holding NaN or Inf a ``ValueError``, naming the key
    and the file; nothing is loaded then. The layers take the adapter's ``lora_alpha``,
    ``use_rslora`` and ``lora_dropout`` (its scaling is part of what it computes).
    With several processes every rank must call it (see the module docstring).
    """
    layers = _lora_layers(_unwrap(model))
    r, lora_alpha, use_rslora, lora_dropout, tensors = _on_rank0(lambda: _read_adapter(path, layers))
    for name, m in layers.items():
        m.lora_alpha, m.use_rslora, m.lora_dropout = lora_alpha, use_rslora, lora_dropout
        with torch.no_grad():
            for part in ("lora_A", "lora_B"):
                _copy_into(getattr(m, part).weight, tensors[f"{KEY_PREFIX}{name}.{part}.weight"])
    logger.info("loaded a LoRA adapter (r=%d, lora_alpha=%s) into %d layers from %s",
                r, lora_alpha, len(layers), os.fspath(path))
    return model


def _copy_into(weight: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor ``full`` into ``weight``, into this rank's shard
    when ``weight`` is sharded (no communication: every rank holds ``full``)."""
    if not is_dtensor(weight):
        weight.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    local = weight.to_local()
    full = full.to(device=local.device, dtype=local.dtype)
    local.copy_(distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None).to_local())


def _read_adapter(path: str | os.PathLike, layers: dict[str, LoRALinear4bit]
                  ) -> tuple[int, float, bool, float, dict[str, torch.Tensor]]:
    """``(r, lora_alpha, use_rslora, lora_dropout, tensors)`` of the adapter
    folder ``path``, checked against ``layers``."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"path: no {os.path.basename(p)} in {os.fspath(path)!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ValueError(f"{config_path}: per-module {field} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias must be 'none', got {config.get('bias')!r}")
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    use_rslora = bool(config.get("use_rslora", False))
    lora_dropout = config.get("lora_dropout", 0.0)
    try:  # the same rules as the layers' own constructor
        check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    lora_dropout = float(lora_dropout)

    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types (truncated, bad header)
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    expected = {f"{KEY_PREFIX}{name}.{part}.weight": (name, part)
                for name in layers for part in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ValueError(f"{weights_path} does not match the model's LoRA layers: "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    errors = []
    for key, (name, part) in expected.items():
        m = layers[name]
        want = (m.r, m.in_features) if part == "lora_A" else (m.out_features, m.r)
        if tuple(tensors[key].shape) != want:
            errors.append(f"{key}: shape {tuple(tensors[key].shape)}, the model's layer needs {want}")
        elif m.r != r:
            errors.append(f"{key}: the config says r={r}, the model's layer has r={m.r}")
    if errors:
        raise ValueError(f"{weights_path}: " + "; ".join(errors[:6]))
    _check_values(weights_path, {key: tensors[key] for key in expected})
    return r, lora_alpha, use_rslora, lora_dropout, tensors


def _check_values(weights_path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse what would load silently wrong: a tensor that is not floating
    point (it would be cast to the layer's dtype) and NaN or Inf, e.g. a few
    flipped bytes (safetensors has no checksum)."""
    not_float = [f"{key}: {t.dtype}" for key, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise TypeError(f"{weights_path}: LoRA weights must be floating point, got "
                        + "; ".join(not_float[:6]) + (" ..." if len(not_float) > 6 else ""))
    bad = []
    for key, t in tensors.items():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            first = tuple(int(i) for i in (~finite).nonzero()[0])
            bad.append(f"{key}: {int((~finite).sum())} of {t.numel()} values are NaN or Inf "
                       f"(first at index {first})")
    if bad:
        raise ValueError(f"{weights_path}: the adapter is corrupt: " + "; ".join(bad[:6])
                         + (" ..." if len(bad) > 6 else ""))


# -- atomic replacement of a folder ----------------------------------------------------

_TEMP_TAG = ".qlora-save-"


def _temp_dirs(path: str) -> list[str]:
    """The temporary siblings of ``path`` that saves create (hidden, tagged)."""
    parent, name = os.path.split(os.path.abspath(path))
    return glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}{_TEMP_TAG}*"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2``
    RENAME_EXCHANGE, macOS ``renamex_np`` RENAME_SWAP); ``False`` if this OS or
    file system cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        rc = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        RENAME_SWAP = 2
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _replace_folder(path: str, write, names: tuple[str, ...] | None = None) -> None:
    """Write ``names`` into folder ``path`` so that a reader (or a kill -9 at any
    moment) sees all the old files or all the new ones, never a mix; with
    ``names`` None, ``write`` makes the whole new folder (nothing old is kept).

    ``write(tmp)`` writes the new files into a fresh hidden sibling folder, which
    also gets hard links to every other entry of ``path`` (so unrelated files stay);
    the files are fsynced, then the two folders are swapped in one atomic
    exchange and the old one removed (so the folder's inode changes: do not save
    into the working directory itself). A save killed midway leaves only a hidden
    sibling ``.<name>.qlora-save-<pid>-...``, never read by ``load_adapter`` and
    removed by the next save. Without an atomic exchange (e.g. NFS, Windows) the
    swap is two renames, so a kill between them leaves ``path`` missing (the old
    files are in the sibling), still never a mix. One writer at a time per folder.
    """
    path = os.path.realpath(path)  # a symlinked folder: replace its target, keep the link
    for stale in _temp_dirs(path):  # left by a killed save
        pid = stale.rpartition(_TEMP_TAG)[2].split("-")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"path: {path!r} exists and is not a directory")
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}{_TEMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if os.path.isdir(path) and names is not None:
            shutil.copytree(path, tmp, symlinks=True, copy_function=_link_or_copy,
                            ignore=lambda d, entries: names if d == path else ())
        else:
            os.makedirs(tmp)
        write(tmp)
        written = names if names is not None else [e.name for e in os.scandir(tmp) if e.is_file()]
        for n in written:
            _fsync(os.path.join(tmp, n))
        _fsync(tmp)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            old = tmp + "-old"
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
