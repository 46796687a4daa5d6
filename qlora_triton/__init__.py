"""qlora_triton: Triton kernels for QLoRA fine-tuning (NF4, double quantization,
fused 4-bit matmuls, LoRA layers, paged optimizers)."""

from .adapter import load_adapter, save_adapter
from .backend import force_backend
from .codebooks import dynamic_map, nf4_codebook
from .convert import merge_adapter, merge_and_unload, replace_linear
from .ddp import wrap_ddp
from .fused import fuse, unfuse
from .linear import Linear4bit, LoRALinear4bit
from .matmul import nf4_matmul, nf4_matmul_grad_input
from .ops.scratch import release_scratch
from .strategy import force_strategy
from .optim import PagedAdamW, PagedAdamW8bit
from .training import prepare_for_kbit_training
from .quantization import dequantize_blockwise_8bit, dequantize_nf4, quantize_blockwise_8bit, quantize_nf4
from .weight import NF4Weight

from .plugins import install as _install_plugins

__version__ = "0.1.0"

_install_plugins()  # transformers' quantizer "qlora_triton" and PEFT's LoRA layer, when those load

# Names that need transformers, imported on first use.
_LAZY = {
    "NF4Config": "hf_quantizer",
    "from_pretrained": "hub",
    "merge_and_quantize": "hub",
}


# Submodules imported on first use: qt.distributed (FSDP2: shard_model, load_sharded, base_bytes, unsharded).
_LAZY_MODULES = ("distributed",)


def __getattr__(name):
    if name in _LAZY or name in _LAZY_MODULES:
        import importlib

        if name in _LAZY_MODULES:
            return importlib.import_module(f".{name}", __name__)
        from .extras import require

        require("transformers", f"qlora_triton.{name}")
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Linear4bit",
    "NF4Config",
    "LoRALinear4bit",
    "NF4Weight",
    "PagedAdamW",
    "PagedAdamW8bit",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "dynamic_map",
    "force_backend",
    "force_strategy",
    "from_pretrained",
    "fuse",
    "load_adapter",
    "merge_adapter",
    "merge_and_quantize",
    "merge_and_unload",
    "nf4_codebook",
    "nf4_matmul",
    "nf4_matmul_grad_input",
    "prepare_for_kbit_training",
    "quantize_blockwise_8bit",
    "quantize_nf4",
    "release_scratch",
    "replace_linear",
    "save_adapter",
    "unfuse",
    "wrap_ddp",
]
