"""How each library runs each case: one builder per (provider, op).

A builder prepares everything a case needs (weights in the provider's own
format, inputs, optimizer state) and returns a zero-argument callable that runs
the op once; the suite times that callable. Inputs are random (never zeros).
When ``copies`` > 1 the callable cycles through that many independent weight
and input sets, so that no call finds its operands in L2.

Providers (the columns of the table):
  qlora_triton  this package
  bitsandbytes  ``matmul_4bit``, ``nn.Linear4bit`` + a LoRA adapter in plain torch
                (as PEFT puts it on top), ``PagedAdamW32bit`` / ``PagedAdamW8bit``
  torchao       ``NF4Tensor`` (``to_nf4``) and ``linear_nf4``
  bf16          dense torch: ``F.linear`` on the bf16 weight, ``torch.optim.AdamW(fused=True)``

A builder raises ``NotApplicable`` where a provider has no such op (bf16 has no
quantize; torch has no 8-bit AdamW); the suite shows that as "n/a".
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .cases import BLOCKSIZE, LORA_ALPHA, LORA_R, NESTED_BLOCKSIZE, Case, nf4_bytes

PROVIDERS = ("qlora_triton", "bitsandbytes", "torchao", "bf16")
DTYPE = torch.bfloat16
LR, WEIGHT_DECAY = 1e-4, 0.01

Fn = Callable[[], object]


class NotApplicable(Exception):
    """The provider has no implementation of this op."""


def provider_status(provider: str) -> str | None:
    """None if the provider imports, else "not installed" or "error: ..."."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    try:
        _modules(provider)
    except ModuleNotFoundError:
        return "not installed"
    except Exception as e:  # a broken install must not stop the suite
        return f"error: import failed: {type(e).__name__}: {e}"
    return None


def _modules(provider: str) -> Any:
    if provider == "qlora_triton":
        return importlib.import_module("qlora_triton")
    if provider == "bitsandbytes":
        return importlib.import_module("bitsandbytes")
    if provider == "torchao":
        return _torchao_nf4()
    return torch


def _torchao_nf4() -> tuple[Callable, Callable]:
    """(to_nf4, linear_nf4); their home moved between torchao releases."""
    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            if importlib.util.find_spec("torchao") is None:
                raise
            continue
        return mod.to_nf4, mod.linear_nf4
    raise ModuleNotFoundError("torchao has no NF4Tensor module (to_nf4 / linear_nf4)")


# -- inputs -----------------------------------------------------------------------------
def _randn(*shape: int, device: torch.device, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, dtype=DTYPE, device=device) * scale
    return t.requires_grad_(grad)


def _dense_weight(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    n, k = shape
    return _randn(n, k, device=device, scale=k**-0.5)


def _cycle(items: list) -> Callable[[], Any]:
    it = itertools.cycle(items)
    return lambda: next(it)


class WeightCache:
    """Quantized weights per (provider, shape, copies), reused over the M
    sweep so that each is built once; the suite clears it between shapes."""

    def __init__(self) -> None:
        self._store: dict[tuple, list] = {}

    def get(self, key: tuple, make: Callable[[], list]) -> list:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]

    def clear(self) -> None:
        self._store.clear()


def _weights(provider: str, shape: tuple[int, int], device: torch.device, copies: int,
             cache: WeightCache | None) -> list:
    """``copies`` weights of ``shape`` in the provider's format."""

    def make() -> list:
        return [_prepare_weight(provider, _dense_weight(shape, device)) for _ in range(copies)]

    return make() if cache is None else cache.get((provider, shape, copies), make)


def _prepare_weight(provider: str, w: torch.Tensor) -> Any:
    if provider == "qlora_triton":
        import qlora_triton as qt

        return qt.quantize_nf4(w, blocksize=BLOCKSIZE, double_quant=True)
    if provider == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        return bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    if provider == "torchao":
        to_nf4, _ = _torchao_nf4()
        return to_nf4(w, BLOCKSIZE, NESTED_BLOCKSIZE)
    return w


# -- quantize / dequantize ----------------------------------------------------------------
def _quantize(provider: str, case: Case, device: torch.device, copies: int, cache: WeightCache | None) -> Fn:
    if provider == "bf16":
        raise NotApplicable("bf16 has no quantization")
    dense = _cycle([_dense_weight(case.shape, device) for _ in range(copies)])
    return lambda: _prepare_weight(provider, dense())


def _dequantize(provider: str, case: Case, device: torch.device, copies: int, cache: WeightCache | None) -> Fn:
    if provider == "bf16":
        raise NotApplicable("bf16 has no quantization")
    weight = _cycle(_weights(provider, case.shape, device, copies, cache))
    if provider == "qlora_triton":
        import qlora_triton as qt

        return lambda: qt.dequantize_nf4(weight(), DTYPE)
    if provider == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        return lambda: bnbf.dequantize_4bit(*weight())
    return lambda: weight().get_original_weight()


# -- the matmuls --------------------------------------------------------------------------
MAX_REL_ERR = 2e-2  # bf16 output against fp32 with the provider's own dequantized weight


class Checked:
    """A case's callable plus ``check()``: the relative error of its output
    against fp32 arithmetic on the same (dequantized) weight, so that a
    miscompiled kernel cannot look fast."""

    def __init__(self, run: Fn, check: Callable[[], float]):
        self.run, self.check = run, check

    def __call__(self) -> object:
        return self.run()


def _dense_fp32(provider: str, w: Any) -> torch.Tensor:
    """The weight a provider actually multiplies by, in fp32."""
    if provider == "qlora_triton":
        import qlora_triton as qt

        return qt.dequantize_nf4(w, torch.float32)
    if provider == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(*w).float()
    if provider == "torchao":
        return w.get_original_weight().float()
    return w.float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _matmul_op(provider: str, grad_input: bool) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``op(w, a)``: ``a @ W.T`` (forward) or ``a @ W`` (input gradient) on the
    provider's weight ``w``. bitsandbytes and torchao have no input-gradient op
    of their own: their autograd backward dequantizes W to bf16 and multiplies,
    and that is what is timed for them."""
    if provider == "qlora_triton":
        import qlora_triton as qt

        return (lambda w, a: qt.nf4_matmul_grad_input(a, w)) if grad_input else (lambda w, a: qt.nf4_matmul(a, w))
    if provider == "bitsandbytes":
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        if grad_input:
            return lambda w, a: a @ bnbf.dequantize_4bit(*w).to(a.dtype)
        return lambda w, a: bnb.matmul_4bit(a, w[0].t(), quant_state=w[1])
    if provider == "torchao":
        _, linear_nf4 = _torchao_nf4()
        return (lambda w, a: a @ w.get_original_weight()) if grad_input else (lambda w, a: linear_nf4(a, w))
    return (lambda w, a: a @ w) if grad_input else (lambda w, a: F.linear(a, w))


def _matmul(provider: str, case: Case, device: torch.device, copies: int, cache: WeightCache | None) -> Fn:
    """``matmul_fwd``: y = x @ W.T, x [M, K]; ``matmul_grad_input``: grad_x =
    grad_y @ W, grad_y [M, N]."""
    n, k = case.shape
    grad_input = case.op == "matmul_grad_input"
    weights = _weights(provider, case.shape, device, copies, cache)
    acts = [_randn(case.m, n if grad_input else k, device=device) for _ in range(copies)]
    op, pairs = _matmul_op(provider, grad_input), _cycle(list(zip(weights, acts)))

    def check() -> float:
        w, a = weights[0], acts[0]
        dense = _dense_fp32(provider, w)
        return _rel_err(op(w, a), a.float() @ (dense if grad_input else dense.t()))

    return Checked(lambda: op(*pairs()), check)


# -- the LoRA layer -----------------------------------------------------------------------
class AdapterOnTop(torch.nn.Module):
    """``base(x) + scaling * (x @ A.T) @ B.T``: a LoRA adapter in plain torch on
    top of a frozen base, the way PEFT wraps bitsandbytes' Linear4bit (dropout 0
    is the identity). A and B are kept in fp32 and cast to the compute dtype
    per call, as qlora_triton's LoRALinear4bit does by default. B starts random,
    not zero, so that no product runs on zeros."""

    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, device: torch.device):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(LORA_R, k, device=device) * k**-0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(n, LORA_R, device=device) * LORA_R**-0.5)
        self.scaling = LORA_ALPHA / LORA_R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + (x @ a.t()) @ b.t() * self.scaling


def _lora_layer(provider: str, shape: tuple[int, int], device: torch.device) -> torch.nn.Module:
    n, k = shape
    w = _dense_weight(shape, device)
    if provider == "qlora_triton":
        import qlora_triton as qt

        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=DTYPE)
        with torch.no_grad():
            linear.weight.copy_(w)
        del w
        layer = qt.LoRALinear4bit.from_linear(linear, r=LORA_R, lora_alpha=LORA_ALPHA)
        with torch.no_grad():  # B is initialised to zeros: never time products on zeros
            for p in layer.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0.0, LORA_R**-0.5)
        return layer
    if provider == "bitsandbytes":
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                 quant_type="nf4")
        # Params4bit quantizes when the module is moved to a device.
        base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=BLOCKSIZE,
                                        compress_statistics=True)
        del w
        return AdapterOnTop(base.to(device), n, k, device)
    if provider == "torchao":
        to_nf4, linear_nf4 = _torchao_nf4()
        nf4 = to_nf4(w, BLOCKSIZE, NESTED_BLOCKSIZE)
        del w
        return AdapterOnTop(lambda x: linear_nf4(x, nf4), n, k, device)
    return AdapterOnTop(lambda x: F.linear(x, w), n, k, device)


def _lora_fwd_bwd(provider: str, case: Case, device: torch.device, copies: int, cache: WeightCache | None) -> Fn:
    """Forward, then the gradients a training step needs: the adapter's
    parameters and the input (what the layer below receives)."""
    n, k = case.shape
    layers = (cache.get((provider, "lora", case.shape, copies),
                        lambda: [_lora_layer(provider, case.shape, device) for _ in range(copies)])
              if cache is not None else [_lora_layer(provider, case.shape, device) for _ in range(copies)])
    sets = _cycle([(layer, [p for p in layer.parameters() if p.requires_grad],
                    _randn(case.m, k, device=device, grad=True), _randn(case.m, n, device=device))
                   for layer in layers])

    def run():
        layer, params, x, grad_y = sets()
        y = layer(x)
        return torch.autograd.grad(y, [x, *params], grad_y)

    return run


# -- the optimizer step -------------------------------------------------------------------
def _optimizer_step(provider: str, case: Case, device: torch.device, copies: int, cache: WeightCache | None) -> Fn:
    """One step over ``case.params`` fp32 parameters in ``case.tensors``
    tensors, gradients random; the state is created by the first (warm-up) step."""
    if provider == "torchao" or (provider == "bf16" and case.variant == "8bit"):
        raise NotApplicable(f"{provider} has no paged {case.variant} AdamW")
    size = math.ceil(case.params / case.tensors)
    params = []
    for _ in range(case.tensors):
        p = torch.nn.Parameter(torch.randn(size, device=device) * 0.02)
        p.grad = torch.randn(size, device=device) * 1e-3
        params.append(p)
    eight = case.variant == "8bit"
    if provider == "qlora_triton":
        import qlora_triton as qt

        cls = qt.PagedAdamW8bit if eight else qt.PagedAdamW
        opt = cls(params, lr=LR, weight_decay=WEIGHT_DECAY)
    elif provider == "bitsandbytes":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if eight else bnb.optim.PagedAdamW32bit
        opt = cls(params, lr=LR, weight_decay=WEIGHT_DECAY)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return opt.step


_BUILDERS = {
    "quantize": _quantize,
    "dequantize": _dequantize,
    "matmul_fwd": _matmul,
    "matmul_grad_input": _matmul,
    "lora_fwd_bwd": _lora_fwd_bwd,
    "optimizer_step": _optimizer_step,
}


def build(provider: str, case: Case, device: torch.device, copies: int = 1,
          cache: WeightCache | None = None) -> Fn:
    """The callable that runs ``case`` once on ``provider``; raises
    ``NotApplicable`` where the provider has no such op."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    return _BUILDERS[case.op](provider, case, device, copies, cache)


def rotation_bytes(provider: str, case: Case) -> int:
    """Bytes of the weight (or optimizer state) one call reads, for deciding how
    many copies to rotate. Independent of M, so that one set of weights serves
    the whole M sweep of a shape."""
    if case.shape is None or case.op in ("quantize", "dequantize"):
        return case.bytes_moved()  # optimizer state; dense + packed weight
    n, k = case.shape
    return 2 * n * k if provider == "bf16" else nf4_bytes(n, k)
