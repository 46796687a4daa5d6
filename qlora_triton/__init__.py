"""qlora_triton: Triton kernels for QLoRA fine-tuning (NF4, double quantization,
fused 4-bit matmuls, LoRA layers, paged optimizers)."""

from .adapter import load_adapter, save_adapter
from .backend import force_backend
from .codebooks import dynamic_map, nf4_codebook
from .convert import merge_and_unload, replace_linear
from .linear import Linear4bit, LoRALinear4bit
from .matmul import nf4_matmul, nf4_matmul_grad_input
from .optim import PagedAdamW, PagedAdamW8bit
from .quantization import dequantize_blockwise_8bit, dequantize_nf4, quantize_blockwise_8bit, quantize_nf4
from .weight import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "Linear4bit",
    "LoRALinear4bit",
    "NF4Weight",
    "PagedAdamW",
    "PagedAdamW8bit",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "dynamic_map",
    "force_backend",
    "load_adapter",
    "merge_and_unload",
    "nf4_codebook",
    "nf4_matmul",
    "nf4_matmul_grad_input",
    "quantize_blockwise_8bit",
    "quantize_nf4",
    "replace_linear",
    "save_adapter",
]
