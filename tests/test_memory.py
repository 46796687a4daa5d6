"""Tensor accounting on the meta device: the strategies' real allocations.

Meta tensors run the launchers' own code (strategy choice, the "dequant"
scratch buffer, the dense matmul) with the kernels skipped; FakeTensors
(torch.compile) keep the shape-only fake impls. TensorMemory counts live
storage bytes; the 7B check compares a whole LoRA step's peak under "dequant"
and "fused" (issue 12: at most one largest bf16 layer apart).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import KernelInterface

import qlora_triton as qt
from qlora_triton import reference
from qlora_triton import strategy as strategy_mod
from qlora_triton.ops import scratch
from qlora_triton.ops.meta import kernels_skipped
from qlora_triton.tensor_memory import TensorMemory
from qlora_triton.weight import NF4Weight

STRATEGIES = ["gemv", "fused", "dequant"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_scratch_left():
    qt.release_scratch()
    yield
    qt.release_scratch()


@pytest.fixture
def tf32_allowed():
    """fp32 on the fused kernels: under torch's default "highest" fp32 precision an
    fp32 product through a weight whose blocks cross rows runs "dequant" whatever
    the strategy (ops/matmul._full_fp32); these tests are about the strategies'
    allocations, so they let fp32 take TF32 dots."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def _meta_layer(N, K, dtype, bias=False):
    layer = qt.LoRALinear4bit(NF4Weight.empty((N, K), dtype, double_quant=random.random() < 0.5), r=4,
                              bias=torch.empty(N, dtype=dtype, device="meta") if bias else None)
    return layer, [*layer.parameters(), *layer.buffers()]


def test_empty_weight_has_quantize_nf4s_layout():
    N, K = random.randint(3, 90), random.randint(3, 90)
    for double_quant in (True, False):
        real = qt.quantize_nf4(torch.randn(N, K), blocksize=32, double_quant=double_quant)
        empty = NF4Weight.empty((N, K), torch.float32, blocksize=32, double_quant=double_quant)
        got = {n: (t.shape, t.dtype, t.device.type) for n, t in empty.tensors().items()}
        assert got == {n: (t.shape, t.dtype, "meta") for n, t in real.tensors().items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_meta_call_runs_the_strategy_and_its_allocations(strategy, tf32_allowed):
    # Odd sizes; M within the GEMV's rows for "gemv" so that it really runs, and
    # small enough that the step's activations stay under one layer's bytes.
    N, K = random.randint(200, 333), random.randint(200, 333)
    M = random.randint(2, 16) if strategy == "gemv" else random.randint(17, 40)
    dtype = random.choice(DTYPES)
    layer, existing = _meta_layer(N, K, dtype, bias=random.random() < 0.5)
    x = torch.empty(M, K, dtype=dtype, device="meta", requires_grad=True)
    before = strategy_mod.strategies.copy()
    with qt.force_strategy(strategy), TensorMemory(existing) as mem:
        with mem.phase("forward"):
            y = layer(x)
        with mem.phase("backward"):
            y.sum().backward()
    ran = strategy_mod.strategies - before
    assert ran == {("forward", strategy): 1, ("grad_input", "fused" if strategy == "gemv" else strategy): 1}
    assert y.shape == (M, N) and y.dtype == dtype and x.grad.shape == (M, K)
    buffers = scratch.scratch_buffers()
    layer_bytes = N * K * torch.empty((), dtype=dtype).element_size()
    if strategy == "dequant":
        (buf,) = buffers.values()
        assert buf.is_meta and buf.dtype == dtype and buf.numel() == N * K
        # the scratch is allocated inside the forward and is alive from then on
        assert mem.phases["forward"]["end_bytes"] - mem.phases["forward"]["start_bytes"] >= layer_bytes
    else:
        assert buffers == {}
        assert mem.peak_bytes() - mem.baseline < layer_bytes  # nothing dense of W


def test_meta_dequant_costs_exactly_one_layer_over_fused(tf32_allowed):
    N, K, M = random.randint(200, 400), random.randint(200, 400), random.randint(20, 60)
    dtype = random.choice(DTYPES)
    layer, existing = _meta_layer(N, K, dtype)
    peaks = {}
    for strategy in ("fused", "dequant"):
        qt.release_scratch()
        x = torch.empty(M, K, dtype=dtype, device="meta", requires_grad=True)
        # a contiguous upstream gradient, as a training step's: the expanded one of
        # .sum() would be copied by the dequant strategy (ops/scratch.dequant_grad_input)
        grad_y = torch.empty(M, N, dtype=dtype, device="meta")
        with qt.force_strategy(strategy), TensorMemory(existing + [grad_y]) as mem:
            layer(x).backward(grad_y)
            layer.zero_grad(set_to_none=True)  # else the next run accumulates into grads it did not count
        peaks[strategy] = mem.peak_bytes()
    assert peaks["dequant"] - peaks["fused"] == N * K * torch.empty((), dtype=dtype).element_size()


def test_meta_under_the_torch_backend_runs_the_reference():
    layer, _ = _meta_layer(70, 90, torch.float32)
    before = strategy_mod.strategies.copy()
    with qt.force_backend("torch"), qt.force_strategy("dequant"):
        y = layer(torch.empty(30, 90, device="meta"))
    assert y.shape == (30, 70) and strategy_mod.strategies == before and scratch.scratch_buffers() == {}


def test_fake_tensors_keep_the_fake_impl_and_never_reach_the_scratch():
    qw = qt.quantize_nf4(torch.randn(70, 90))
    before = strategy_mod.strategies.copy()
    with qt.force_strategy("dequant"), FakeTensorMode() as mode:
        fake_qw = NF4Weight(**{n: mode.from_tensor(t) for n, t in qw.tensors().items()},
                            shape=qw.shape, dtype=qw.dtype, blocksize=qw.blocksize)
        y = qt.nf4_matmul(torch.empty(33, 90), fake_qw)
        g = qt.nf4_matmul_grad_input(torch.empty(33, 70), fake_qw)
    assert y.shape == (33, 70) and g.shape == (33, 90)
    assert scratch.scratch_buffers() == {} and strategy_mod.strategies == before


def test_kernels_skipped_only_for_meta_and_only_inside(device):
    if not (device.type == "cuda" or qt.backend.INTERPRET):
        pytest.skip("needs a Triton kernel that can run (CUDA or TRITON_INTERPRET=1)")
    original = KernelInterface.__getitem__
    qw = qt.quantize_nf4(torch.randn(37, 64, device=device))
    x = torch.randn(21, 64, device=device)
    with kernels_skipped(), kernels_skipped(), qt.force_backend("triton"), qt.force_strategy("fused"):
        assert KernelInterface.__getitem__ is not original
        y = qt.nf4_matmul(x, qw)  # a real launch inside the block still runs
    assert KernelInterface.__getitem__ is original  # restored once the outer block ends
    ref = reference.nf4_matmul(x.double(), qw)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-3


def test_tensor_memory_counts_live_storages_once():
    a_n, b_n = random.randint(100, 1000), random.randint(100, 1000)
    existing = torch.empty(a_n, device="meta")
    with TensorMemory([existing, existing[1:]]) as mem:
        assert mem.live_bytes() == mem.baseline == 4 * a_n  # a view shares the storage
        with mem.phase("make"):
            b = torch.empty(b_n, 3, dtype=torch.float16, device="meta")
            view = b.t()           # no new storage
            b.add_(1)              # in place: none either
            c = b.float()          # new: 4 bytes per element
            del c
        assert mem.phases["make"] == {"start_bytes": 4 * a_n, "peak_bytes": 4 * a_n + 2 * 3 * b_n + 4 * 3 * b_n,
                                      "end_bytes": 4 * a_n + 2 * 3 * b_n}
        del b
        assert mem.live_bytes() == 4 * a_n + 2 * 3 * b_n  # the view keeps the storage
        del view
        assert mem.live_bytes() == 4 * a_n
    assert mem.peak_bytes() == 4 * a_n + 6 * 3 * b_n


# -- the 7B check (issue 12, Done when: "Peak memory of a 7B-shape LoRA step") -------
def test_7b_lora_step_dequant_peak_is_fused_plus_at_most_one_layer():
    from qlora_triton.finetune.strategy_memory import step_peaks

    # All 32 layers at LLaMA-7B shapes on the meta device: seconds, no memory.
    result = step_peaks("7b", device="meta", batch_size=1, seq_len=256,
                        strategies_to_run=("fused", "dequant"))
    layer = 11008 * 4096 * 2
    assert result["largest_layer_bytes"] == layer
    fused, dequant = (result["strategies"][s] for s in ("fused", "dequant"))
    assert fused["ran"] == {"forward/fused": 448, "grad_input/fused": 224}  # 224 linears, checkpointed
    assert dequant["ran"] == {"forward/dequant": 448, "grad_input/dequant": 224}
    # a NF4 7B (about 3.5 GiB of weights) plus activations: a real model's size, not a toy's
    assert 3.5 * 2**30 < fused["peak_bytes"] < 6 * 2**30
    assert dequant["peak_bytes"] <= fused["peak_bytes"] + layer
    assert dequant["peak_bytes"] - fused["peak_bytes"] >= 0.9 * layer  # the tracker sees the scratch
    assert dequant["scratch_buffers"] == {"bfloat16": layer}  # one buffer, the largest layer
    assert fused["scratch_buffers"] == {}
    for s in (fused, dequant):
        assert set(s["phases"]) == {"forward", "backward", "optimizer"}
        assert max(p["peak_bytes"] for p in s["phases"].values()) == s["peak_bytes"]


def test_cli_memory_only_prints_every_strategy(tmp_path, capsys):
    from qlora_triton.cli import main

    args = ["finetune", "--preset", "tiny", "--memory-only", "--device", "meta", "--seq-len", "16",
            "--output-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()
            if line.startswith("  ") and line.split()[1:2] == ["peak"]] == STRATEGIES
    assert (tmp_path / "memory-tiny.json").is_file()
    assert main(args + ["--steps", "3"]) == 2 and "--steps" in capsys.readouterr().err
    assert main(["finetune", "--memory-only"]) == 2 and "--preset" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device accounting needs CUDA")
def test_device_accounting_sees_the_scratch_on_cuda():
    from qlora_triton.tensor_memory import DeviceMemory

    N, K = 1024, 768  # N * K * 2 bytes: whole allocator blocks
    layer = qt.LoRALinear4bit(qt.quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16)), r=4)
    peaks = {}
    for strategy in ("fused", "dequant"):
        x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with qt.force_strategy(strategy):
            layer(x).float().sum().backward()  # compile, autotune, cuBLAS workspace: not measured
        layer.zero_grad(set_to_none=True)
        qt.release_scratch()
        with qt.force_strategy(strategy), DeviceMemory(torch.device("cuda")) as mem:
            with mem.phase("step"):
                layer(x).float().sum().backward()
        layer.zero_grad(set_to_none=True)
        peaks[strategy] = mem.result()["phases"]["step"]["peak_bytes"]
    assert N * K * 2 <= peaks["dequant"] - peaks["fused"] <= N * K * 2 + 2**20


# -- issue 23: attention as the GPU's kernel holds it, the options, the step estimator --------
def _activations(result, strategy="fused"):
    s = result["strategies"][strategy]
    return s["peak_bytes"] - s["baseline_bytes"]


def test_meta_attention_is_accounted_without_scores():
    from qlora_triton.finetune.strategy_memory import step_peaks

    seq = 1024
    scores = 4 * seq * seq * 2  # tiny: 4 heads; one bf16 [1, 4, S, S] tensor
    math = step_peaks("tiny", device="meta", seq_len=seq, strategies_to_run=("fused",), attention="math",
                      liger=True)
    flash = step_peaks("tiny", device="meta", seq_len=seq, strategies_to_run=("fused",), liger=True)
    assert flash["options"]["attention"] == "flash" and math["options"]["attention"] == "math"
    assert _activations(math) >= scores  # the math path holds the scores (and more)
    assert _activations(flash) < scores  # the flash accounting holds none
    assert _activations(math) - _activations(flash) >= scores
    with pytest.raises(ValueError, match="attention"):
        step_peaks("tiny", device="meta", seq_len=8, attention="eager")


def test_meta_options_liger_and_offload_and_the_breakdown():
    from qlora_triton.finetune.strategy_memory import TAG_INPUTS, format_peaks, step_peaks

    seq, hidden, layers = 96, 128, 2
    plain = step_peaks("tiny", device="meta", seq_len=seq, strategies_to_run=("fused",))
    both = step_peaks("tiny", device="meta", seq_len=seq, strategies_to_run=("fused",), liger=True,
                      offload=True)
    p, b = plain["strategies"]["fused"], both["strategies"]["fused"]
    assert b["offload"]["offloaded_tensors"] == layers
    assert b["offload"]["offloaded_bytes"] == layers * seq * hidden * 2
    assert b["peak_bytes"] < p["peak_bytes"]
    # the breakdown adds up to the peak; with offload at most one layer's input stays
    for r in (p, b):
        assert sum(r["peak_breakdown"].values()) == r["peak_bytes"]
        assert r["peak_breakdown"]["weights"] == r["baseline_bytes"]
    assert b["peak_breakdown"].get(TAG_INPUTS, 0) <= seq * hidden * 2
    text = format_peaks(both)
    assert "options: liger, offload" in text and "offloaded to the host: 2 layer inputs" in text


def test_cli_speedup_flags(capsys):
    from qlora_triton.cli import main

    base = ["finetune", "--preset", "tiny", "--memory-only", "--device", "meta", "--seq-len", "8"]
    assert main(base + ["--no-liger", "--offload", "--no-fuse"]) == 0
    assert "options: offload;" in capsys.readouterr().out
    assert main(["finetune", "--estimate-step"]) == 2 and "--preset" in capsys.readouterr().err


def test_cli_fuse_flag_runs_the_fused_blocks(capsys):
    from qlora_triton.cli import main

    base = ["finetune", "--preset", "tiny", "--memory-only", "--device", "meta", "--seq-len", "16"]
    assert main(base + ["--fuse"]) == 0
    assert "options: fuse" in capsys.readouterr().out


def test_step_estimate_counts_the_ops(capsys):
    from qlora_triton.cli import main
    from qlora_triton.finetune import step_estimate

    result = step_estimate.estimate_step("tiny", seq_len=16, r=4)
    q, l16 = result["rows"]["qlora"], result["rows"]["lora16"]
    assert "qlora_fused" in result["rows"]
    # the same matmuls (NF4 costs a bf16 matmul's flops), fewer weight bytes
    assert q["flops"] > 0 and abs(q["flops"] - l16["flops"]) <= 0.02 * l16["flops"]
    assert q["bytes"] < l16["bytes"]
    for row in (q, l16):
        floor = max(row["flops"] / step_estimate.FLOPS, row["bytes"] / step_estimate.BANDWIDTH)
        assert row["seconds"] >= (floor + row["launches"] * step_estimate.LAUNCH_SECONDS) * (1 - 1e-9)
        assert row["launches"] > 50
    text = step_estimate.format_estimate(result)
    assert "ESTIMATED" in text and "7.9e+14 flop/s" in text and "4.3e+12 B/s" in text and "4 us" in text
    assert main(["finetune", "--preset", "tiny", "--estimate-step", "--device", "cpu"]) == 2
    assert "--device" in capsys.readouterr().err
