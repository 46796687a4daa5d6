"""The package's ops in the ``torch.library`` namespace ``qlora_triton``, so that
``torch.compile`` traces them as single nodes (no graph breaks) and
``torch.library.opcheck`` can test them.

Defined with ``Library.define`` + ``impl`` (CompositeExplicitAutograd) +
``register_fake``: the dispatcher calls the Python kernel directly. That is the
registration ``custom_op`` builds on, without the Python layers it adds to
every call (an autograd wrapper, a redispatch, an output-aliasing check:
a trivial op cost 27 us per call through custom_op and 8 us this way, on the
2-CPU development machine); opcheck and
``torch.compile(fullgraph=True)`` pass alike (docs/backends.md: ``triton_op`` does
not, on CPU tensors). Gradients come from :class:`qlora_triton.matmul.NF4Matmul`,
not from the ops.

An op takes an :class:`NF4Weight` as its tensors plus ints, since a schema
cannot hold a dataclass (:func:`weight_args`). Each implementation dispatches
with :func:`qlora_triton.backend.use_triton` to the Triton launcher or the
reference.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import reference
from .backend import forced_backend, use_triton
from .weight import NF4Weight

_lib = torch.library.Library("qlora_triton", "DEF")
_WEIGHT_SCHEMA = ("Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, "
                  "Tensor? offset")
_SIZES_SCHEMA = "int n, int k, int blocksize, int blocksize2"
_lib.define(f"nf4_matmul(Tensor x, {_WEIGHT_SCHEMA}, Tensor? bias, {_SIZES_SCHEMA}) -> Tensor")
_lib.define(f"nf4_matmul_grad_input(Tensor grad_y, {_WEIGHT_SCHEMA}, {_SIZES_SCHEMA}) -> Tensor")
_lib.define(f"nf4_lora_matmul(Tensor x, {_WEIGHT_SCHEMA}, Tensor? bias, Tensor h, Tensor lora_b, "
            f"float scaling, {_SIZES_SCHEMA}) -> Tensor")

# The NF4Weight each live weight_args() tuple came from, by id of its packed
# tensor: an op called with those very tensors reuses it instead of building
# (and validating) a new one per call. Weak: an entry lives as long as its
# weight does, so an id is never reused while it is here.
_weights: "weakref.WeakValueDictionary[int, NF4Weight]" = weakref.WeakValueDictionary()


def weight_args(qw: NF4Weight) -> tuple:
    """``qw`` as the ops take it: (packed, absmax, code, absmax2, code2, offset)
    then (n, k, blocksize, blocksize2)."""
    if not torch.compiler.is_compiling():  # a compiled graph calls the ops with other tensors
        _weights[id(qw.packed)] = qw
    n, k = qw.shape
    return (qw.packed, qw.absmax, qw.code, qw.absmax2, qw.code2, qw.offset,
            n, k, qw.blocksize, qw.blocksize2)


def _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2) -> NF4Weight:
    qw = _weights.get(id(packed))
    if (qw is not None and qw.packed is packed and qw.absmax is absmax and qw.code is code
            and qw.absmax2 is absmax2 and qw.code2 is code2 and qw.offset is offset
            and qw.shape == (n, k) and qw.blocksize == blocksize and qw.blocksize2 == blocksize2):
        return qw
    # Tensors from elsewhere (opcheck, a compiled graph, a direct torch.ops call):
    # build, and so check, a weight. dtype is the dense weight's default
    # dequantize dtype; no op here reads it.
    return NF4Weight(packed=packed, absmax=absmax, shape=torch.Size((n, k)), dtype=torch.float32,
                     blocksize=blocksize, code=code, absmax2=absmax2, code2=code2, offset=offset,
                     blocksize2=blocksize2)


def _nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor | None,
                code2: Tensor | None, offset: Tensor | None, bias: Tensor | None,
                n: int, k: int, blocksize: int, blocksize2: int) -> Tensor:
    """``x @ W.T (+ bias)``: x [..., k] -> [..., n] in x's dtype."""
    return _run_matmul(use_triton(x.device), x, packed, absmax, code, absmax2, code2, offset, bias,
                       n, k, blocksize, blocksize2)


def _run_matmul(triton: bool, x, packed, absmax, code, absmax2, code2, offset, bias,
                n, k, blocksize, blocksize2) -> Tensor:
    qw = _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if triton:
        from .ops.matmul import nf4_matmul as launch
        y = launch(x2, qw, bias)
    else:
        y = reference.nf4_matmul(x2, qw, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _nf4_matmul_grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                           absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
                           n: int, k: int, blocksize: int, blocksize2: int) -> Tensor:
    """``grad_y @ W``: grad_y [..., n] -> [..., k] in grad_y's dtype."""
    return _run_grad_input(use_triton(grad_y.device), grad_y, packed, absmax, code, absmax2, code2,
                           offset, n, k, blocksize, blocksize2)


def _run_grad_input(triton: bool, grad_y, packed, absmax, code, absmax2, code2, offset,
                    n, k, blocksize, blocksize2) -> Tensor:
    qw = _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2)
    g2 = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, n)
    if triton:
        from .ops.matmul import nf4_matmul_grad_input as launch
        gx = launch(g2, qw)
    else:
        gx = reference.nf4_matmul_grad_input(g2, qw)
    return gx if grad_y.dim() == 2 else gx.reshape(*grad_y.shape[:-1], k)


def _nf4_lora_matmul(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Tensor | None,
                     code2: Tensor | None, offset: Tensor | None, bias: Tensor | None, h: Tensor,
                     lora_b: Tensor, scaling: float, n: int, k: int, blocksize: int,
                     blocksize2: int) -> Tensor:
    """``x @ W.T (+ bias) + scaling * h @ lora_b.T``: x [..., k], h [..., r] ->
    [..., n] in x's dtype (the LoRA forward after ``h = x_d @ lora_A.T``)."""
    return _run_lora_matmul(use_triton(x.device), x, packed, absmax, code, absmax2, code2, offset,
                            bias, h, lora_b, scaling, n, k, blocksize, blocksize2)


def _run_lora_matmul(triton: bool, x, packed, absmax, code, absmax2, code2, offset, bias, h,
                     lora_b, scaling, n, k, blocksize, blocksize2) -> Tensor:
    qw = _weight(packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    h2 = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
    if triton:
        from .ops.matmul import nf4_lora_matmul as launch
        y = launch(x2, qw, bias, h2, lora_b, scaling)
    else:
        y = reference.nf4_matmul(x2, qw, bias)
        y.addmm_(h2, lora_b.t(), alpha=scaling)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


_lib.impl("nf4_matmul", _nf4_matmul, "CompositeExplicitAutograd")
_lib.impl("nf4_lora_matmul", _nf4_lora_matmul, "CompositeExplicitAutograd")
_lib.impl("nf4_matmul_grad_input", _nf4_matmul_grad_input, "CompositeExplicitAutograd")


@torch.library.register_fake("qlora_triton::nf4_matmul", lib=_lib)
def _(x, packed, absmax, code, absmax2, code2, offset, bias, n, k, blocksize, blocksize2):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("qlora_triton::nf4_lora_matmul", lib=_lib)
def _(x, packed, absmax, code, absmax2, code2, offset, bias, h, lora_b, scaling, n, k, blocksize,
      blocksize2):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("qlora_triton::nf4_matmul_grad_input", lib=_lib)
def _(grad_y, packed, absmax, code, absmax2, code2, offset, n, k, blocksize, blocksize2):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


# Meta tensors (tensor accounting: qlora_triton.tensor_memory) run the launchers'
# own code, as a GPU call would: the strategy choice, the "dequant" scratch
# buffer, the GEMV's split-K partials and the dense matmul, all on meta, with
# the kernels skipped (ops/meta.py); the reference under force_backend("torch").
# Unforced, a meta call chooses as a GPU without a table of its own would (the
# sm_90 rows of strategy.CROSSOVER), so accounting on meta models a GPU run.
# These replace the Meta kernels register_fake made above. FakeTensors
# (torch.compile, FakeTensorMode) never get here: they take the fake impls.
def _on_meta(run):
    def meta_kernel(*args):
        from .ops.meta import kernels_skipped

        with kernels_skipped():
            return run(forced_backend() != "torch", *args)

    return meta_kernel


_lib.impl("nf4_matmul", _on_meta(_run_matmul), "Meta", allow_override=True)
_lib.impl("nf4_matmul_grad_input", _on_meta(_run_grad_input), "Meta", allow_override=True)
_lib.impl("nf4_lora_matmul", _on_meta(_run_lora_matmul), "Meta", allow_override=True)
