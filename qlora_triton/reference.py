"""Plain-torch reference implementations of every op.

They define the numerics the Triton kernels must reproduce, run on any device,
and are the CPU backend when Triton's interpreter is off. Written for clarity,
not speed: they materialize what the kernels never do (e.g. a dense weight).
"""

from __future__ import annotations

import torch

from .adamw_scalars import STATE_BLOCKSIZE, AdamWScalars
from .codebooks import dynamic_map, midpoints
from .weight import NF4Weight


def nf4_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat weight -> ``(packed uint8 [(n+1)//2], absmax fp32 [nblocks])``."""
    x = x.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = [blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]]
    if full < n:  # the partial last block divides, as bitsandbytes does
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled.append(x[full:] / tail_max)
    scaled = torch.cat([s.reshape(-1) for s in scaled]).clamp(-1, 1)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = torch.bucketize(scaled, midpoints(code).to(x.device)).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def nf4_dequantize(qw: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    codes = torch.stack([qw.packed >> 4, qw.packed & 0xF], dim=1).reshape(-1)[: qw.numel]
    scale = qw.absmax_fp32().repeat_interleave(qw.blocksize)[: qw.numel]
    return (qw.code[codes.long()] * scale).to(dtype).reshape(qw.shape)


def blockwise_8bit_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat tensor -> ``(q uint8 [n], absmax fp32 [nblocks])``, nearest code of
    ``x * (1 / absmax)`` per block."""
    x = x.reshape(-1).float()
    n = x.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([x, x.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    q = torch.bucketize(scaled.reshape(-1)[:n], midpoints(code).to(x.device))
    return q.to(torch.uint8), absmax


def blockwise_8bit_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = q.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.reshape(-1).long()] * scale).to(dtype)


def nf4_matmul(x: torch.Tensor, qw: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W dequantized in fp32; output in ``x.dtype``."""
    w = nf4_dequantize(qw, torch.float32)
    # Contiguous first: BLAS sums a strided x in another order (bits differ).
    y = x.float().contiguous() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def nf4_matmul_grad_input(grad_y: torch.Tensor, qw: NF4Weight) -> torch.Tensor:
    """``grad_y @ W``, the input gradient of ``x @ W.T``; output in ``grad_y.dtype``."""
    w = nf4_dequantize(qw, torch.float32)
    return (grad_y.float().contiguous() @ w).to(grad_y.dtype)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               scalars: AdamWScalars, exp_avg_absmax: torch.Tensor | None = None,
               exp_avg_sq_absmax: torch.Tensor | None = None,
               nonfinite: torch.Tensor | None = None) -> None:
    """One AdamW update in place, torch.optim.AdamW's single-tensor ops in fp32.

    32-bit: fp32 moments. 8-bit (uint8 ``exp_avg``): codes into the signed /
    unsigned dynamic maps with one absmax per 256 elements, dequantized, updated
    and requantized (see ops/optimizer.py); ``nonfinite`` as there."""
    s = scalars
    eight_bit = exp_avg.dtype == torch.uint8
    if eight_bit:
        signed, unsigned = dynamic_map(param.device, signed=True), dynamic_map(param.device, signed=False)
        m = blockwise_8bit_dequantize(exp_avg, exp_avg_absmax, signed, STATE_BLOCKSIZE)
        v = blockwise_8bit_dequantize(exp_avg_sq, exp_avg_sq_absmax, unsigned, STATE_BLOCKSIZE)
    else:
        m, v = exp_avg.view(-1), exp_avg_sq.view(-1)
    p = param.view(-1).float()  # the param itself when fp32
    g = grad.reshape(-1).float()
    p.mul_(s.decay)
    m.lerp_(g, 1 - s.beta1)
    v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
    denom = (v.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    p.addcdiv_(m, denom, value=-s.step_size)
    if p.dtype != param.dtype:
        param.view(-1).copy_(p)
    if eight_bit:
        for x, codes, absmax, code in ((m, exp_avg, exp_avg_absmax, signed), (v, exp_avg_sq, exp_avg_sq_absmax, unsigned)):
            # A NaN/Inf moment element (from a NaN/Inf gradient) is stored as 0:
            # it would make its whole block's absmax NaN/Inf (see ops/optimizer.py).
            finite = torch.isfinite(x)
            if nonfinite is not None:  # no device sync: a max on the device
                torch.maximum(nonfinite, (~finite).any().to(nonfinite.dtype), out=nonfinite)
            x = torch.where(finite, x, 0.0)
            q, a = blockwise_8bit_quantize(x, code, STATE_BLOCKSIZE)
            codes.view(-1).copy_(q)
            absmax.copy_(a)
