"""The matmul strategies (qlora_triton.strategy): every strategy forced, forward
and grad-input, against the float64 reference of docs/testing.md; the
"dequant" strategy's one reused scratch buffer; the LoRA layer folding its
rank-r term under each strategy; torch.compile; how a strategy is chosen."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
import weakref

import pytest
import torch

import qlora_triton as qt
from qlora_triton import backend as _backend
from qlora_triton import reference
from qlora_triton import strategy as strategy_mod
from qlora_triton.ops import scratch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not installed

from benchmarks.launches import count_launches  # noqa: E402

TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
STRATEGIES = ["gemv", "fused", "dequant"]
MS = [1, 3, 17, 70]
SHAPES = [  # (N, K, blocksize): N and K never multiples of a tile
    (77, 200, 64),    # K not a multiple of the blocksize: blocks cross rows
    (100, 384, 128),  # aligned: the GEMV's word path
    (75, 131, 32),    # odd K and odd N * K: a padding nibble at the end
]
# Every (strategy, M, dtype); shape, double quant and bias cycle at other rates.
CASES = [(s, M, dtype, SHAPES[i % 3], i % 2 == 0, (i // 3) % 2 == 0)
         for i, (s, M, dtype) in enumerate(itertools.product(STRATEGIES, MS, TOL))]
# A third of them in the GPU subset: each (strategy, M) once, every dtype.
CASES = [pytest.param(c, marks=pytest.mark.gpu) if (MS.index(c[1]) + list(TOL).index(c[2])) % 3 == 0 else c
         for c in CASES]
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or _backend.INTERPRET),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _case_id(case):
    s, M, dtype, (N, K, bs), dq, bias = case
    return f"{s}-M{M}-{str(dtype)[6:]}-{N}x{K}-bs{bs}-{'dq' if dq else 'fp32absmax'}-{'bias' if bias else 'nobias'}"


def _weight(N, K, blocksize=64, double_quant=True, device="cpu"):
    w = torch.randn(N, K) * torch.rand(N, 1).pow(3).add(0.05)  # rows of very different scale
    return qt.quantize_nf4(w.to(device), blocksize=blocksize, double_quant=double_quant)


def _rel_err(out, ref):
    out = out.detach().cpu().double()
    assert not out.isnan().any(), "NaN in the output"
    return float((out - ref).norm() / ref.norm())


def _ran(backend, strategy, M, dtype=None, K=None, bs=None):
    """The strategies a forward + grad-input call ran (the reference runs none).
    fp32 through a weight whose blocks cross rows (K % bs != 0) under torch's
    default "highest" fp32 precision runs "dequant" whatever the strategy
    (ops/matmul._full_fp32)."""
    if backend == "torch":
        return {}
    if (dtype == torch.float32 and K % bs and torch.get_float32_matmul_precision() == "highest"):
        strategy = "dequant"
    forward = "fused" if strategy == "gemv" and M > strategy_mod.GEMV_MAX_M else strategy
    return {("forward", forward): 1, ("grad_input", "dequant" if strategy == "dequant" else "fused"): 1}


@pytest.fixture(autouse=True)
def _no_scratch_left():
    yield
    qt.release_scratch()


# -- every strategy against the reference ------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_grad_input_match_reference(backend, device, case):
    strategy, M, dtype, (N, K, bs), dq, has_bias = case
    qw = _weight(N, K, bs, dq, device)
    dense = reference.nf4_dequantize(qw, torch.float32).double().cpu()
    x = torch.randn(M, K).to(dtype).to(device)
    g = torch.randn(M, N).to(dtype).to(device)
    bias = torch.randn(N).to(dtype).to(device) if has_bias else None
    before = strategy_mod.strategies.copy()
    with qt.force_strategy(strategy):
        y = qt.nf4_matmul(x, qw, bias)
        gx = qt.nf4_matmul_grad_input(g, qw)
    assert strategy_mod.strategies - before == _ran(backend, strategy, M, dtype, K, bs)
    y_ref = x.cpu().double() @ dense.t() + (bias.cpu().double() if has_bias else 0)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert gx.dtype == dtype and gx.shape == (M, K) and gx.is_contiguous()
    assert _rel_err(y, y_ref) <= TOL[dtype]
    assert _rel_err(gx, g.cpu().double() @ dense) <= TOL[dtype]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M, dropout", [(3, 0.0), (70, 0.0), (17, 0.25)])
def test_lora_forward_and_grads_match_reference(backend, device, strategy, dtype, M, dropout):
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(131, 75, device=device), r=5, lora_dropout=dropout,
                                          blocksize=32)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.2)
    x = torch.randn(M, 131, device=device).to(dtype).requires_grad_()
    g = torch.randn(M, 75, device=device).to(dtype)
    seed = torch.seed()
    with qt.force_strategy(strategy):
        y = layer(x)
        y.backward(g)
    mask = None
    if dropout:
        torch.manual_seed(seed)  # the same draw the layer made
        mask = torch.empty(x.shape, dtype=torch.bool, device=device).bernoulli_(1 - dropout).double() / (1 - dropout)
    w = reference.nf4_dequantize(layer.quant_weight, torch.float32).double()
    x64 = x.detach().double().requires_grad_()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    b = layer.lora_B.weight.detach().double().requires_grad_()
    x_d = x64 if mask is None else x64 * mask
    y_ref = x64 @ w.t() + layer.bias.detach().double() + layer.scaling * (x_d @ a.t()) @ b.t()
    y_ref.backward(g.double())
    assert y.dtype == dtype and _rel_err(y, y_ref.detach()) <= TOL[dtype]
    assert x.grad.dtype == dtype and _rel_err(x.grad, x64.grad) <= TOL[dtype]
    assert _rel_err(layer.lora_A.weight.grad, a.grad) <= TOL[dtype]
    assert _rel_err(layer.lora_B.weight.grad, b.grad) <= TOL[dtype]


# -- the scratch buffer --------------------------------------------------------------
@needs_triton
def test_scratch_is_one_buffer_reused_across_layers_and_calls(device):
    big, small = _weight(90, 160, device=device), _weight(40, 96, device=device)
    with qt.force_backend("triton"), qt.force_strategy("dequant"):
        first = None
        for qw in (big, small, big, small):  # largest first, then smaller
            y = qt.nf4_matmul(torch.randn(5, qw.shape[1], device=device), qw)
            gx = qt.nf4_matmul_grad_input(torch.randn(5, qw.shape[0], device=device), qw)
            (buf,) = scratch.scratch_buffers().values()
            first = buf if first is None else first  # held: a new buffer could not reuse its address
            assert buf.numel() == big.numel and buf.data_ptr() == first.data_ptr()
            outputs = {y.untyped_storage().data_ptr(), gx.untyped_storage().data_ptr()}
            assert buf.untyped_storage().data_ptr() not in outputs  # results never alias the scratch
        # Another dtype gets its own buffer; each (device, dtype) has exactly one.
        qt.nf4_matmul(torch.randn(5, 96, device=device).half(), small)
        assert set(scratch.scratch_buffers()) == {(big.device, torch.float16), (big.device, torch.float32)}


@needs_triton
def test_scratch_grows_without_two_alive_and_is_released(device):
    small, big = _weight(40, 96, device=device), _weight(90, 160, device=device)
    with qt.force_backend("triton"), qt.force_strategy("dequant"):
        qt.nf4_matmul(torch.randn(3, 96, device=device), small)
        old = weakref.ref(scratch.scratch_buffers()[(small.device, torch.float32)])
        qt.nf4_matmul(torch.randn(3, 160, device=device), big)
        assert old() is None  # the smaller buffer is gone
        new = weakref.ref(scratch.scratch_buffers()[(big.device, torch.float32)])
        assert new().numel() == big.numel
    qt.release_scratch()
    assert scratch.scratch_buffers() == {} and new() is None


def test_reference_backend_uses_no_scratch(device):
    with qt.force_backend("torch"), qt.force_strategy("dequant"):
        y = qt.nf4_matmul(torch.randn(3, 96, device=device), _weight(40, 96, device=device))
    assert scratch.scratch_buffers() == {} and y.shape == (3, 40)


@needs_triton
@pytest.mark.parametrize("module", ["nf4_matmul", "LoRALinear4bit"])
def test_scratch_is_never_saved_for_backward(device, module):
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(160, 90), r=4).to(device)
    x = torch.randn(70, 160, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with qt.force_backend("triton"), qt.force_strategy("dequant"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = qt.nf4_matmul(x, layer.quant_weight) if module == "nf4_matmul" else layer(x)
        (buf,) = scratch.scratch_buffers().values()
        storage = buf.untyped_storage().data_ptr()
        assert saved or module == "nf4_matmul"  # the LoRA layer saves x, h and the adapters
        assert all(t.untyped_storage().data_ptr() != storage for t in saved)
        y.square().sum().backward()  # the backward dequantizes again, into the same buffer
        assert scratch.scratch_buffers()[buf.device, buf.dtype].data_ptr() == buf.data_ptr()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="side streams need CUDA")
def test_dequant_on_side_streams_matches_default_stream():
    layers = [_weight(900, 1600, device="cuda"), _weight(400, 960, device="cuda")]
    xs = [torch.randn(300, qw.shape[1], device="cuda", dtype=torch.bfloat16) for qw in layers]
    with qt.force_strategy("dequant"):
        want = [qt.nf4_matmul(x, qw) for x, qw in zip(xs, layers)]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        got = []
        for _ in range(3):
            for s, x, qw in zip(streams, xs, layers):
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    got.append(qt.nf4_matmul(x, qw))
        torch.cuda.synchronize()
    for i, y in enumerate(got):
        assert torch.equal(y, want[i % 2])


# -- the LoRA fold ---------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_folds_the_rank_r_term_into_the_base_products(device, strategy):
    """Forward: beside the base product, x @ A.T and one addmm_ into its output;
    grad_x: one addmm_ into the base grad-input (no [M, N] or [M, K] temporary)."""
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(128, 96, device=device), r=8)
    x = torch.randn(40, 128, requires_grad=True, device=device)
    with qt.force_backend("triton"), qt.force_strategy(strategy):
        with torch.no_grad():
            with count_launches() as lora:
                layer(x)
            with count_launches() as base:
                qt.nf4_matmul(x, layer.quant_weight, layer.bias)
        assert lora - base == {"aten.mm": 1, "aten.addmm_": 1}, (lora, base)
        y = layer(x)
        with count_launches() as backward:
            y.backward(torch.randn_like(y))
    assert backward["aten.addmm_"] == 1 and "aten.add_" not in backward, backward


# -- torch.compile ------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_lora_forward_and_backward_have_no_graph_break(backend, device, strategy):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(96, 40, device=device), r=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(20, 96, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    with qt.force_strategy(strategy):
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_()
            before = strategy_mod.strategies.copy()
            y = fn(xi)
            y.square().sum().backward()
            # the compiled graph runs the forced strategy too (read inside the op)
            assert strategy_mod.strategies - before == _ran(backend, strategy, 20, torch.float32, 96, 64)
            results.append((y.detach(), xi.grad, layer.lora_A.weight.grad.clone()))
            layer.zero_grad()
    assert torch._dynamo.utils.counters["graph_break"] == {}
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


# -- choosing the strategy -----------------------------------------------------------
def test_force_strategy_nests_and_rejects_unknown_names():
    cpu = torch.device("cpu")
    pick = lambda M: strategy_mod.select_strategy(M, 4096, 4096, torch.bfloat16, cpu)  # noqa: E731
    with qt.force_strategy("dequant"):
        assert pick(1) == "dequant"
        with qt.force_strategy("gemv"):
            assert pick(16) == "gemv" and pick(17) == "fused"  # the GEMV takes <= 16 rows
        with qt.force_strategy(None):
            assert pick(4096) == "fused"
        assert pick(4096) == "dequant"
    assert pick(8) == "gemv" and pick(70) == "fused"
    for bad in ("cublas", "GEMV", 1):
        with pytest.raises(ValueError, match="strategy must be 'gemv', 'fused', 'dequant' or None"):
            with qt.force_strategy(bad):
                pass
    assert pick(70) == "fused"  # a rejected name changes nothing


def test_sm90_table_crossover(monkeypatch):
    monkeypatch.setattr(strategy_mod, "gpu_kind", lambda device: "sm_90")
    gpu = torch.device("cuda")  # never touched: gpu_kind is patched

    def pick(M, N=4096, K=4096, dtype=torch.bfloat16, op="forward"):
        return strategy_mod.select_strategy(M, N, K, dtype, gpu, op=op)

    fwd = strategy_mod.CROSSOVER["sm_90", "large", torch.bfloat16]
    gin = strategy_mod.GRAD_INPUT_CROSSOVER["sm_90", "large", torch.bfloat16]
    assert gin < fwd  # the grad-input's fused kernel is the slower one (its own crossover)
    assert [pick(m) for m in (1, 16, 17, fwd - 1, fwd, 4096)] == ["gemv", "gemv", "fused", "fused",
                                                                   "dequant", "dequant"]
    assert [pick(m, op="grad_input") for m in (16, gin - 1, gin, fwd - 1)] == [
        "gemv", "fused", "dequant", "dequant"]
    assert pick(4096, dtype=torch.float16) == "dequant" and pick(4096, dtype=torch.float32) == "fused"
    small = strategy_mod.CROSSOVER["sm_90", "small", torch.bfloat16]  # its own row
    assert pick(small - 1, 1000, 1000) == "fused" and pick(small, 1000, 1000) == "dequant"
    monkeypatch.setattr(strategy_mod, "gpu_kind", lambda device: "sm_80")  # no rows: sm_90's
    assert pick(fwd) == "dequant" and pick(256) == "fused"
    with pytest.raises(ValueError, match="op must be 'forward' or 'grad_input', got 'backward'"):
        pick(1, op="backward")


def test_crossover_file_sets_each_products_table(monkeypatch, tmp_path):
    monkeypatch.setattr(strategy_mod, "CROSSOVER", dict(strategy_mod.CROSSOVER))
    monkeypatch.setattr(strategy_mod, "GRAD_INPUT_CROSSOVER", dict(strategy_mod.GRAD_INPUT_CROSSOVER))
    path = tmp_path / "crossover.json"
    path.write_text(json.dumps({"gpu_kind": "sm_90", "crossover": [
        {"bucket": "large", "dtype": "bfloat16", "dequant_from_m": 300},
        {"bucket": "large", "dtype": "bfloat16", "dequant_from_m": 200, "op": "grad_input"}]}))
    assert strategy_mod.load_crossover(path) == {("sm_90", "large", torch.bfloat16): 300,
                                                 ("sm_90", "large", torch.bfloat16, "grad_input"): 200}
    with strategy_mod.assume_gpu_kind("sm_90"):
        cpu = torch.device("cpu")
        assert strategy_mod.select_strategy(300, 4096, 4096, torch.bfloat16, cpu) == "dequant"
        assert strategy_mod.select_strategy(299, 4096, 4096, torch.bfloat16, cpu) == "fused"
        assert strategy_mod.select_strategy(200, 4096, 4096, torch.bfloat16, cpu, op="grad_input") == "dequant"
        assert strategy_mod.select_strategy(199, 4096, 4096, torch.bfloat16, cpu, op="grad_input") == "fused"
    path.write_text(json.dumps({"gpu_kind": "sm_90", "crossover": [
        {"bucket": "large", "dtype": "bfloat16", "dequant_from_m": 300, "op": "backward"}]}))
    with pytest.raises(ValueError, match="not a table of benchmarks.crossover"):
        strategy_mod.load_crossover(path)


def test_environment_variable_chooses_and_is_checked(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(strategy_mod, "_env", "dequant")
    assert strategy_mod.select_strategy(3, 64, 64, torch.float32, cpu) == "dequant"
    with qt.force_strategy("fused"):  # the context manager wins
        assert strategy_mod.select_strategy(3, 64, 64, torch.float32, cpu) == "fused"
    monkeypatch.setattr(strategy_mod, "_env", "fastest")
    with pytest.raises(ValueError, match="QLORA_TRITON_STRATEGY must be .* got 'fastest'"):
        strategy_mod.select_strategy(3, 64, 64, torch.float32, cpu)


@needs_triton
def test_environment_variable_reaches_the_dispatcher():
    code = ("import torch, qlora_triton as qt; from qlora_triton.strategy import strategies; "
            "qw = qt.quantize_nf4(torch.randn(40, 64)); "
            "qt.nf4_matmul(torch.randn(70, 64), qw); print(dict(strategies))")
    env = dict(os.environ, QLORA_TRITON_STRATEGY="dequant")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "{('forward', 'dequant'): 1}"
