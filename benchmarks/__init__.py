"""qlora_triton's benchmark suite (a folder of the repository, not installed).

``python -m benchmarks`` (or ``qlora-triton bench``) runs every op and the whole
LoRA layer against bitsandbytes, torchao and dense bf16; see README.md here.
"""
