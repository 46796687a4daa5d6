"""The fine-tuning commands' optimizer: ``qt.PagedAdamW``, paged when it can be.

Paged (CUDA unified memory) states need the nvcc-built managed-memory helper
(``kernels/managed_alloc.cu``, built by ``QLORA_TRITON_BUILD_CUDA=1 pip install``).
An install without it (no nvcc, a ``--no-deps`` install on a bare machine) should
still fine-tune: the optimizer then keeps its states in plain device memory
(``paged=False``) and says so once on stderr. The phases, the presets and the
multi-rank run all build their optimizer here, so they fall back alike.
"""

from __future__ import annotations

import sys

import torch


def can_page(device: torch.device) -> bool:
    """Whether ``PagedAdamW(paged=True)`` can page on ``device``; on a CUDA device
    without the helper, print why not (stderr) and return False."""
    if torch.device(device).type != "cuda":
        return True  # on the CPU the same class runs on plain tensors; paged has no effect
    from qlora_triton import paged

    try:
        paged.helper()
        return True
    except paged.ManagedMemoryError as err:
        print(f"qlora-triton finetune: PagedAdamW with paged=False: {err}", file=sys.stderr)
        return False


def paged_adamw(params: list[torch.nn.Parameter], **settings):
    """``qt.PagedAdamW(params, paged=can_page(device of params), **settings)``."""
    import qlora_triton as qt

    params = list(params)
    if not params:
        raise ValueError("params: no trainable parameters to optimize")
    return qt.PagedAdamW(params, paged=can_page(params[0].device), **settings)
