"""The results JSON: its schema (a JSON-Schema subset, as a dict) and a small
validator for it, so that checking needs no extra dependency.

benchmarks/README.md documents every field; this dict is the same contract in
a form a program can check. Supported keywords: type (a name or a list of
names), enum, required, properties, additionalProperties (false only), items,
minimum.
"""

from __future__ import annotations

from typing import Any

from .cases import OPS
from .providers import PROVIDERS

SCHEMA_VERSION = 1
STATUSES = ("ok", "n/a", "not installed", "error")

_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_NUM_OR_NULL = {"type": ["number", "null"], "minimum": 0}

META = {
    "type": "object",
    "required": ["date", "device", "gpu", "gpu_slug", "driver", "cuda", "python", "torch", "triton",
                 "bitsandbytes", "torchao", "qlora_triton", "git_commit", "git_dirty", "smoke", "timer",
                 "command"],
    "properties": {
        "date": _STR,                       # UTC, ISO 8601
        "device": {"enum": ["cuda", "cpu"]},
        "gpu": _STR,                        # torch.cuda.get_device_name, or "cpu"
        "gpu_slug": _STR,                   # the results folder's prefix, e.g. "h200"
        "driver": _STR_OR_NULL,             # nvidia-smi's driver_version
        "cuda": _STR_OR_NULL,               # torch.version.cuda
        "python": _STR,
        "torch": _STR,
        "triton": _STR,
        "bitsandbytes": _STR_OR_NULL,       # null: not installed
        "torchao": _STR_OR_NULL,
        "qlora_triton": _STR,
        "git_commit": _STR_OR_NULL,         # null outside a git checkout
        "git_dirty": {"type": ["boolean", "null"]},
        "smoke": {"type": "boolean"},
        "timer": _STR,
        "command": _STR,
        "strategy": {"enum": ["gemv", "fused", "dequant", None]},  # --strategy (optional; null: default)
    },
}

CEILINGS = {
    "type": "object",
    "required": ["copy_GBps", "matmul_TFLOPs", "copy_bytes", "matmul_size"],
    "additionalProperties": False,
    "properties": {
        "copy_GBps": {"type": "number", "minimum": 0},      # (read + written bytes) / time
        "matmul_TFLOPs": {"type": "number", "minimum": 0},  # bf16, random data
        "copy_bytes": {"type": "integer", "minimum": 1},
        "matmul_size": {"type": "integer", "minimum": 1},   # n of the n x n x n product
    },
}

RESULT = {
    "type": "object",
    "required": ["case", "op", "shape", "n", "k", "m", "params", "variant", "provider", "status", "error",
                 "ms", "peak_mem_MB", "resident_mem_MB", "bytes", "flops", "floor_ms", "bound", "x_floor",
                 "copies", "rel_err"],
    "additionalProperties": False,
    "properties": {
        "case": _STR,                       # unique per case, e.g. "matmul_fwd-4096x4096-M16"
        "op": {"enum": list(OPS)},
        "shape": _STR,                      # "NxK" (out x in features) or "N params"
        "n": _INT_OR_NULL,
        "k": _INT_OR_NULL,
        "m": _INT_OR_NULL,                  # rows of x; null for ops without activations
        "params": _INT_OR_NULL,             # optimizer_step only
        "variant": _STR,                    # optimizer_step: "32bit" or "8bit"; else ""
        "provider": {"enum": list(PROVIDERS)},
        "status": {"enum": list(STATUSES)},
        "error": _STR_OR_NULL,              # the exception, for status "error" / "not installed"
        "ms": _NUM_OR_NULL,                 # median time of one call
        "peak_mem_MB": _NUM_OR_NULL,        # torch allocator peak of the case (CUDA only)
        "resident_mem_MB": _NUM_OR_NULL,    # cudaMemGetInfo delta, sees managed memory (CUDA only)
        "bytes": {"type": "integer", "minimum": 0},   # fewest bytes moved
        "flops": {"type": "integer", "minimum": 0},
        "floor_ms": {"type": "number", "minimum": 0},
        "bound": {"enum": ["memory", "compute"]},
        "x_floor": _NUM_OR_NULL,            # ms / floor_ms
        "copies": _INT_OR_NULL,             # input sets rotated through to defeat L2
        "rel_err": _NUM_OR_NULL,            # matmuls: ||out - ref|| / ||ref||, ref in fp32 on the same weight
        # qlora_triton matmul_fwd: the static sm_90 profile's figures for this
        # case (benchmarks/estimates.py), compile-time estimates; optional.
        "sass_estimate": {"type": ["object", "null"]},
        # qlora_triton rows: the matmul strategy that ran (qlora_triton.strategy);
        # null where no product ran on the Triton backend. Optional.
        "strategy": {"enum": ["gemv", "fused", "dequant", None]},
        # --time-strategies: ms under each forced strategy (null: not a strategy
        # of its own for this case). Optional.
        "strategy_ms": {"type": ["object", "null"], "additionalProperties": False,
                        "properties": {s: _NUM_OR_NULL for s in ("gemv", "fused", "dequant")}},
        # qlora_triton matmul and LoRA rows: each strategy's bytes at its peak
        # above what the call leaves alive (benchmarks/strategy_memory.py; null:
        # the strategy runs another's code there), and how they were measured.
        "strategy_memory": {"enum": ["cuda_max_memory_allocated", "meta_tensor_accounting"]},
        "strategy_extra_peak_bytes": {"type": "object", "additionalProperties": False,
                                      "required": ["gemv", "fused", "dequant"],
                                      "properties": {s: _INT_OR_NULL for s in ("gemv", "fused", "dequant")}},
    },
}

SCHEMA = {
    "type": "object",
    "required": ["schema_version", "meta", "ceilings", "providers", "results"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "meta": META,
        "ceilings": CEILINGS,
        "providers": {"type": "object"},    # provider -> "ok" | "not installed" | "error: ..."
        "results": {"type": "array", "items": RESULT},
    },
}

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _is(value: Any, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False  # bool is an int in Python, not in JSON
    return isinstance(value, _TYPES[type_name])


def _check(value: Any, schema: dict, path: str, errors: list[str]) -> None:
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, t) for t in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r:.60}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                _check(sub, props[key], f"{path}.{key}", errors)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", errors)


def validate(doc: Any) -> list[str]:
    """Every way ``doc`` breaks the schema (empty when it conforms), plus the
    rules a schema cannot say: an "ok" row has a positive time, an "error" row
    says what failed, and (case, provider) is unique."""
    errors: list[str] = []
    _check(doc, SCHEMA, "$", errors)
    if errors:
        return errors
    seen = set()
    for i, row in enumerate(doc["results"]):
        where = f"$.results[{i}]"
        if row["status"] == "ok" and not (row["ms"] is not None and row["ms"] > 0):
            errors.append(f"{where}: status ok needs a positive ms, got {row['ms']!r}")
        if row["status"] != "ok" and row["ms"] is not None:
            errors.append(f"{where}: status {row['status']!r} must not carry a time")
        if row["status"] in ("error", "not installed") and not row["error"]:
            errors.append(f"{where}: status {row['status']!r} needs an error message")
        key = (row["case"], row["provider"])
        if key in seen:
            errors.append(f"{where}: duplicate row for {key}")
        seen.add(key)
    return errors
