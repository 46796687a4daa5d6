"""End-to-end fine-tuning: pre-train a small LLaMA, then QLoRA and 16-bit LoRA side by side.

``python -m qlora_triton.finetune`` or ``qlora-triton finetune``; the Python API is
``run(FinetuneConfig(...))`` and ``run_preset(name, ...)``.
"""

from .presets import LLAMA_SHAPES, run_preset
from .train import FinetuneConfig, run

__all__ = ["FinetuneConfig", "LLAMA_SHAPES", "run", "run_preset"]
