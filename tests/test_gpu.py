"""Checks that only a CUDA device can make (skipped without one): split-K
kernels at the shipped sm_90 tiles on concurrent streams, and CUDA graph
capture and replay of a warmed LoRALinear4bit forward. Part of the curated
``pytest -m gpu`` subset (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

import qlora_triton as qt
from qlora_triton.ops import split as split_mod
from qlora_triton.ops import tuned_sm90

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (streams, CUDA graphs, compiled kernels)")]

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
N, K = 1024, 4096  # at the shipped tiles every kernel below splits K (asserted)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    assert not out.isnan().any(), "NaN in the output"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_kernels_on_concurrent_streams(dtype):
    """GEMV (M = 1: FMA kernel; M = 8: tensor cores) and the fused GEMM (M = 40)
    at a shape where the shipped configs split K, launched back to back on two
    streams: each stream's split counters and partial sums stay its own."""
    x_fp32 = dtype == torch.float32
    splits = {"gemv fma": tuned_sm90.gemv_config("fma", N, K, 64, x_fp32).kwargs["SPLIT_K"],
              "gemv dot": tuned_sm90.gemv_config("dot", N, K, 64, x_fp32).kwargs["SPLIT_K"],
              "gemm": tuned_sm90.gemm_config("forward", 40, N, K, 64, x_fp32).kwargs["SPLIT_K"]}
    assert min(splits.values()) > 1, f"pick a shape that splits K at the shipped tiles: {splits}"
    device = torch.device("cuda")
    qw = qt.quantize_nf4(torch.randn(N, K, device=device))
    dense = qt.dequantize_nf4(qw, torch.float32).double()
    xs = [torch.randn(M, K, device=device, dtype=dtype) for M in (1, 1, 8, 8, 40, 40)]
    refs = [x.double() @ dense.t() for x in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = []
    with qt.force_backend("triton"):
        for _ in range(8):
            for i, x in enumerate(xs):
                stream = streams[i % 2]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    outs.append((i, qt.nf4_matmul(x, qw)))
    torch.cuda.synchronize()
    for i, y in outs:
        assert _rel_err(y, refs[i]) <= TOL[dtype], (i, xs[i].shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_graph_replays_a_warmed_lora_forward_at_m1(dtype):
    """A decode step (M = 1, eval, no grad) captured once: replays give the eager
    output for new inputs, so nothing the forward does (caches, split counters,
    checks) syncs the host or allocates outside the graph."""
    device = torch.device("cuda")
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(K, N, device=device), r=8).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # the LoRA path counts
    static_x = torch.randn(1, K, device=device, dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), qt.force_backend("triton"):
        with torch.cuda.stream(side):  # warm up (caches, compiles) off the capture
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        counters = dict(split_mod._split_counters)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on a stream of its own, not seen before
            static_y = layer(static_x)
        # A split counter made during capture is the graph's, not kept for eager launches.
        assert split_mod._split_counters.keys() == counters.keys()
        assert all(split_mod._split_counters[key] is count for key, count in counters.items())
        for _ in range(3):
            x = torch.randn(1, K, device=device, dtype=dtype)
            static_x.copy_(x)
            graph.replay()
            eager = layer(x)
            torch.cuda.synchronize()
            assert static_y.dtype == dtype and static_y.shape == (1, N)
            # split-K adds partial sums in no fixed order: equal up to rounding
            assert _rel_err(static_y, eager.double()) <= TOL[dtype]
            w = qt.dequantize_nf4(layer.quant_weight, torch.float32).double()
            a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
            ref = x.double() @ w.t() + layer.scaling * (x.double() @ a.t()) @ b.t() + layer.bias.double()
            assert _rel_err(static_y, ref) <= TOL[dtype]
