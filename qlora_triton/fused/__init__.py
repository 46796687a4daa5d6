"""Fused decoder blocks: a gated LoRA MLP and a decoder block's q, k, v, each
as one autograd Function over NF4 weights (:func:`fuse`, :func:`unfuse`).

Modules: ``ops`` (the torch.library ops: stacked NF4 products and the gated
activation), ``projection`` (what a block takes from each layer), ``mlp`` and
``qkv`` (the autograd Functions), ``modules`` (the nn.Module side), ``fuse``
(finding the blocks by structure).
"""

from .fuse import fuse, unfuse

__all__ = ["fuse", "unfuse"]
