"""bf16 matmuls computed in fp32 on a CPU without native bf16 support.

On a CPU without AVX-512 (no ``avx512_core``, let alone ``avx512_bf16`` or
AMX), torch has no fast bf16 matmul: oneDNN refuses bf16 there and the
fallback kernel ran a ``[1536, 192] x [192, 512]`` product about 9x slower
than the fp32 one (65 ms against 7 ms, measured 2026-12-04 on a 2-core AMD
EPYC). A 16-bit LoRA step of the demo's model took 2.4-3.3 s there, nearly
all of it in bf16 ``aten::mm``.

:class:`Bf16MatmulInFp32` is a ``TorchDispatchMode`` that, inside its
``with`` block, runs the matmuls and the attention of bf16 CPU tensors
(``mm``, ``addmm``, ``bmm``, ``baddbmm``, their in-place and ``out=`` forms,
and the CPU flash-attention kernel behind ``scaled_dot_product_attention``,
forward and backward) as: bf16 operands widened to fp32 (exact), the fp32
kernel (fp32 accumulation), the result rounded to bf16 once. That is what a
bf16 GEMM with fp32 accumulation computes (a GPU's tensor cores, oneDNN's
bf16 kernels), up to the order of the sums; everything else stays as it was:
the weights, activations and gradients are bf16 tensors, every other op runs
in bf16, and the memory each tensor takes is unchanged. It applies only to
CPU tensors: on CUDA it changes nothing (and the fine-tune never enters it).

The fine-tune's two phases both run inside it when :func:`resolve` says
``"fp32"`` (``--bf16-matmul auto`` on a CPU without native bf16), so the
comparison stays like for like; the table and ``summary.json`` say so.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
BF16 = torch.bfloat16

SETTINGS = ("auto", "native", "fp32")

# functional op -> its result is rounded to bf16
_FUNCTIONAL = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
# in-place / out= form -> the functional op whose fp32 result is copied into self / out
_INPLACE = {aten.addmm_.default: aten.addmm.default, aten.baddbmm_.default: aten.baddbmm.default}
_OUT = {aten.mm.out: aten.mm.default, aten.addmm.out: aten.addmm.default,
        aten.bmm.out: aten.bmm.default, aten.baddbmm.out: aten.baddbmm.default}
# attention: op -> which outputs are bf16 in the native op (logsumexp stays fp32 there too)
_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (True, False),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (True, True, True),
}
MATMUL_OPS = frozenset((*_FUNCTIONAL, *_INPLACE, *_OUT))
ATTENTION_OPS = frozenset(_ATTENTION)


def native_bf16_supported() -> bool:
    """Whether torch's CPU build has native bf16 kernels here (oneDNN's own
    check, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``: CPUs with AVX-512
    pass it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve(setting: str, device: torch.device | str) -> str:
    """``"native"`` or ``"fp32"`` for ``--bf16-matmul SETTING`` on ``device``.

    ``auto``: ``"fp32"`` on a CPU without native bf16, ``"native"`` elsewhere
    (always on CUDA). ``fp32`` asked for on CUDA is refused: the mode only
    ever changes CPU tensors, and a GPU run keeps its bf16 kernels."""
    if setting not in SETTINGS:
        raise ValueError(f"bf16_matmul: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    device = torch.device(device)
    if setting == "fp32" and device.type != "cpu":
        raise ValueError(f"bf16_matmul: 'fp32' is for the CPU; on {device.type} the bf16 kernels run as they are")
    if setting == "auto":
        return "fp32" if device.type == "cpu" and not native_bf16_supported() else "native"
    return setting


def describe(chosen: str) -> str:
    """One line for the table: how the bf16 matmuls ran."""
    if chosen == "fp32":
        return ("bf16 matmuls and attention (both columns): bf16 operands, computed in fp32 and rounded "
                "to bf16, as a bf16 GEMM with fp32 accumulation does; this CPU has no native bf16 "
                "(--bf16-matmul native: torch's own bf16 kernels)")
    return "bf16 matmuls and attention: torch's native bf16 kernels"


def _up(t):
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == BF16 else t


def _all_bf16_cpu(args) -> bool:
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return bool(floats) and all(a.dtype == BF16 and a.device.type == "cpu" for a in floats)


class Bf16MatmulInFp32(TorchDispatchMode):
    """Inside ``with``: bf16 CPU matmuls and attention widened to fp32 and rounded
    back (module docstring). ``counts`` holds how many calls of each op it
    widened, for tests and for the curious."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def _count(self, func) -> None:
        name = str(func)
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_OPS:
            out = kwargs.get("out")
            tensors = [*args, *([out] if out is not None else [])]
            if not _all_bf16_cpu(tensors):  # mixed dtypes: torch's own check and error
                return func(*args, **kwargs)
            self._count(func)
            wide = [_up(a) for a in args]
            if func in _INPLACE:
                return args[0].copy_(_INPLACE[func](*wide, **kwargs))
            if func in _OUT:
                rest = {k: v for k, v in kwargs.items() if k != "out"}
                return out.copy_(_OUT[func](*wide, **rest))
            return func(*wide, **kwargs).to(BF16)
        if func in ATTENTION_OPS:
            qkv = args[1:4] if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default \
                else args[:3]
            if not _all_bf16_cpu(qkv):
                return func(*args, **kwargs)
            self._count(func)
            outs = func(*[_up(a) for a in args], **{k: _up(v) for k, v in kwargs.items()})
            return tuple(o.to(BF16) if rounded else o for o, rounded in zip(outs, _ATTENTION[func]))
        return func(*args, **kwargs)
