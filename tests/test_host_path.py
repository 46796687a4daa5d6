"""The lean host path: a module's NF4Weight is built once and never goes stale,
eval-mode cast copies follow their parameters, and a decode step launches the
fewest kernels (counted with benchmarks/launches.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import qlora_triton as qt
from qlora_triton import backend as _backend
from qlora_triton import weight as weight_mod
from qlora_triton.ops.dequantize import nf4_dequantize

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not installed

from benchmarks.launches import count_launches  # noqa: E402


def lora_layer(k=96, n=80, r=4, dtype=torch.float32, bias=True, device=None):
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(k, n, bias=bias, dtype=dtype, device=device), r=r,
                                          lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def fresh_copy(layer):
    """A newly built module with ``layer``'s current tensors (nothing cached)."""
    if isinstance(layer, qt.LoRALinear4bit):
        new = qt.LoRALinear4bit(layer.quant_weight, layer.bias, r=layer.r, lora_alpha=layer.lora_alpha,
                                lora_dropout=layer.lora_dropout, compute_dtype=layer.compute_dtype,
                                lora_dtype=layer.lora_A.weight.dtype)
        with torch.no_grad():
            new.lora_A.weight.copy_(layer.lora_A.weight)
            new.lora_B.weight.copy_(layer.lora_B.weight)
    else:
        new = qt.Linear4bit(layer.quant_weight, layer.bias, compute_dtype=layer.compute_dtype)
    return new.train(layer.training)


def same_output(layer, x, want=None):
    with torch.no_grad():
        got = layer(x)
        want = fresh_copy(layer)(x) if want is None else want
    assert torch.equal(got, want)


@pytest.fixture
def builds(monkeypatch):
    """How many NF4Weights get built (in modules and in the ops)."""
    count = [0]
    real = weight_mod.NF4Weight.__post_init__

    def counting(self):
        count[0] += 1
        real(self)

    monkeypatch.setattr(weight_mod.NF4Weight, "__post_init__", counting)
    return count


# -- built once ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Linear4bit", "LoRALinear4bit"])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_builds_no_weight(backend, device, builds, kind, grad):
    layer = lora_layer(device=device) if kind == "LoRALinear4bit" else qt.Linear4bit.from_linear(
        torch.nn.Linear(96, 80, device=device))
    layer.eval()
    x = torch.randn(3, 96, requires_grad=grad, device=device)
    qw = layer.quant_weight
    before = builds[0]
    for _ in range(3):
        with torch.set_grad_enabled(grad):
            y = layer(x)
        if grad:
            y.sum().backward()
    assert builds[0] == before, "forward (or backward) built an NF4Weight"
    assert layer.quant_weight is qw


def test_public_nf4_matmul_reuses_the_callers_weight(backend, device, builds):
    qw = qt.quantize_nf4(torch.randn(40, 64, device=device))
    x = torch.randn(2, 64, device=device)
    before = builds[0]
    qt.nf4_matmul(x, qw)
    assert builds[0] == before
    # The op on tensors it has not seen builds (and so checks) a weight.
    args = qt.library.weight_args(qw)
    torch.ops.qlora_triton.nf4_matmul(x, *(t.clone() for t in args[:6]), None, *args[6:])
    assert builds[0] == before + 1


# -- never stale -----------------------------------------------------------------
@pytest.fixture(params=["Linear4bit", "LoRALinear4bit"])
def pair(request, device):
    """(dst, src): same shapes, different weights; dst has run (its caches are warm)."""
    make = (lambda: lora_layer(device=device)) if request.param == "LoRALinear4bit" else (
        lambda: qt.Linear4bit.from_linear(torch.nn.Linear(96, 80, device=device)))
    dst, src = make().eval(), make().eval()
    x = torch.randn(2, 96, device=device)
    with torch.no_grad():
        dst(x)
    return dst, src, x


def test_load_state_dict_renews_the_weight(backend, device, pair):
    dst, src, x = pair
    dst.load_state_dict(src.state_dict())
    same_output(dst, x, want=src(x).detach())


def test_load_state_dict_with_peft_prefix_renews_the_weight(backend, device, pair):
    dst, src, x = pair
    sd = {(k if k.startswith("lora_") else "base_layer." + k): v for k, v in src.state_dict().items()}
    dst.load_state_dict(sd)
    same_output(dst, x, want=src(x).detach())


def test_dense_weight_quantized_on_load_renews_the_weight(backend, device, pair):
    dst, _, x = pair
    dense = torch.nn.Linear(96, 80, device=device)
    sd = {k: v for k, v in dst.state_dict().items() if k.startswith("lora_")} | dense.state_dict()
    dst.load_state_dict(sd)
    base = qt.Linear4bit.from_linear(dense)
    want = base(x).detach()
    if isinstance(dst, qt.LoRALinear4bit):
        with torch.no_grad():
            want = want + dst.scaling * (x @ dst.lora_A.weight.t()) @ dst.lora_B.weight.t()
        torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    else:
        same_output(dst, x, want=want)


def test_parameter_assignment_renews_the_weight(backend, device, pair):
    dst, src, x = pair
    # Only the packed bytes: the weight must combine the new bytes with the old scales.
    dst.weight = torch.nn.Parameter(src.weight.detach().clone(), requires_grad=False)
    same_output(dst, x)
    for name, p in src.nf4_parameters().items():
        setattr(dst, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    if dst.bias is not None:
        dst.bias.data = src.bias.detach().clone()
    if isinstance(dst, qt.LoRALinear4bit):
        dst.lora_A.weight, dst.lora_B.weight = (torch.nn.Parameter(p.detach().clone())
                                                for p in (src.lora_A.weight, src.lora_B.weight))
    same_output(dst, x, want=src(x).detach())


def test_in_place_edits_are_seen(backend, device, pair):
    dst, src, x = pair
    with torch.no_grad():  # (the NF4 storage is among the parameters)
        for mine, theirs in zip(dst.parameters(), src.parameters()):
            mine.copy_(theirs)
    same_output(dst, x, want=src(x).detach())


def test_apply_renews_the_weight(backend, device, pair):
    dst, src, x = pair
    dst._apply(lambda t: t.clone())  # every tensor replaced ...
    with torch.no_grad():            # ... then the new ones edited in place
        for mine, theirs in zip(dst.parameters(), src.parameters()):
            mine.copy_(theirs)
    same_output(dst, x, want=src(x).detach())


def test_deepcopy_edits_reach_the_copys_weight(backend, device, pair):
    import copy

    dst, src, x = pair
    twin = copy.deepcopy(dst)
    with torch.no_grad():
        for mine, theirs in zip(twin.parameters(), src.parameters()):
            mine.copy_(theirs)
    same_output(twin, x, want=src(x).detach())
    assert not torch.equal(dst(x), twin(x))  # the original kept its own weight


@pytest.mark.parametrize("move", ["half", "to_bfloat16", "to_empty"])
def test_dtype_and_device_moves_renew_the_weight(backend, device, pair, move):
    dst, src, x = pair
    if move == "half":
        dst.half()
        x = x.half()
    elif move == "to_bfloat16":
        dst.to(torch.bfloat16)
        x = x.bfloat16()
    else:  # through the meta device and back: every tensor is a new, empty one
        dst.to("meta").to_empty(device=device)
        dst.load_state_dict(src.state_dict())
        same_output(dst, x, want=src(x).detach())
        return
    same_output(dst, x)
    assert all(not p.is_floating_point() for p in dst.nf4_parameters().values())


# -- the eval-mode cast copies of the bias and adapters ------------------------------
def test_eval_cast_copies_follow_their_parameters(backend, device):
    layer = lora_layer(device=device).eval()  # fp32 bias and adapters, bf16 input
    x = torch.randn(2, 96, dtype=torch.bfloat16, device=device)
    same_output(layer, x)
    with torch.no_grad():
        layer.lora_B.weight.add_(1.0)  # in place, seen by the version counter
    same_output(layer, x)
    layer.train()  # a training step, then back to eval
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.5)
    layer(x.float()).square().sum().backward()
    opt.step()
    layer.eval()
    same_output(layer, x)
    layer.lora_A.weight.data.mul_(2.0)  # invisible to autograd and to the cache until eval()
    layer.eval()
    same_output(layer, x)
    layer.load_state_dict(lora_layer(device=device).state_dict())
    same_output(layer, x)


def test_eval_cast_copies_made_in_inference_mode_serve_autograd(backend, device):
    layer = lora_layer(device=device).eval()
    layer.lora_A.weight.requires_grad_(False)
    layer.lora_B.weight.requires_grad_(False)
    x = torch.randn(2, 96, dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        want = layer(x)
    xg = x.clone().requires_grad_()
    y = layer(xg)  # the cached copies are saved for backward: they must be normal tensors
    y.float().sum().backward()
    assert torch.equal(y.detach(), want) and xg.grad is not None


def test_training_forward_does_not_cache_casts(backend, device):
    layer = lora_layer(device=device)  # training mode
    x = torch.randn(2, 96, dtype=torch.bfloat16, device=device)
    layer(x)
    assert layer._casts == {}


def test_compiled_eval_forward_has_no_graph_break(backend, device):
    torch._dynamo.reset()
    layer = lora_layer(device=device).eval()
    x = torch.randn(1, 96, dtype=torch.bfloat16, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want, got = layer(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        layer.load_state_dict(lora_layer(device=device).state_dict())  # new NF4 parameters: a guard must notice
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# -- kernel launches -------------------------------------------------------------
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or _backend.INTERPRET),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@needs_triton
def test_the_counter_counts_what_launches(device):
    x = torch.randn(5, 8, device=device)
    qw = qt.quantize_nf4(torch.randn(64, device=device))
    with count_launches() as counts:
        x.t().reshape(-1)[:3].view(3, 1)  # views, and one copy (reshape of a transpose)
        torch.empty(4, device=device)                    # no fill
        x.to(torch.float16)               # a cast
        x.to(torch.float32)               # no-op
        torch.zeros(3, device=device)                    # a fill
        nf4_dequantize(qw, torch.float32)  # the launcher: one Triton kernel
    assert counts == {"aten.clone": 1, "aten._to_copy": 1, "aten.zeros": 1,
                      "triton.nf4_dequantize_kernel": 1}, counts


def _eval_counts(layer, x):
    with torch.no_grad():
        layer(x)  # warm: caches, autotuning
        with count_launches() as counts:
            layer(x)
    return counts


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_eval_forward_adds_one_launch_to_the_base(device, dtype):
    """Beside the base product: x @ A.T only; at M = 1 the scaled update is folded
    into the GEMV's epilogue (issue 22; no casts of the fp32 adapters or bias,
    no scaling multiply, no [M, N] temporary)."""
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(128, 96, device=device), r=8).eval()  # fp32 adapters
    x = torch.randn(1, 128, dtype=dtype, device=device)
    with qt.force_backend("triton"):
        lora = _eval_counts(layer, x)
        with torch.no_grad():
            qt.nf4_matmul(x, layer.quant_weight, layer.bias.to(dtype))
            with count_launches() as base:
                qt.nf4_matmul(x, layer.quant_weight, layer.bias.to(dtype))
    assert lora - base == {"aten.mm": 1}, (lora, base)
    assert sum(base.values()) >= 1 and any(k.startswith("triton.") for k in base)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_matmul_at_m1_is_one_launch(device, dtype):
    """The target of issue 11: one kernel for a decode-sized product (no zero
    fill, no cast). Waits for the kernel rework of ops/matmul.py."""
    qw = qt.quantize_nf4(torch.randn(96, 128, device=device))
    x = torch.randn(1, 128, dtype=dtype, device=device)
    with qt.force_backend("triton"), torch.no_grad():
        qt.nf4_matmul(x, qw)
        with count_launches() as counts:
            qt.nf4_matmul(x, qw)
    assert sum(counts.values()) == 1, dict(counts)


@needs_triton
@pytest.mark.parametrize("m", [1, 5, 16])
def test_lora_eval_forward_up_to_m16_is_two_launches(device, m):
    """Issue 22's target, as a user's layer runs it (bf16 input, fp32 master adapters, a bias,
    dropout that eval mode skips): x @ A.T, then the GEMV with the scaled update folded into its
    epilogue: the FMA GEMV at M = 1, the tensor-core one at 2..16 (K a multiple of the blocksize;
    otherwise the per-element GEMV runs and the update is an addmm_ after it)."""
    layer = qt.LoRALinear4bit.from_linear(torch.nn.Linear(128, 96, device=device), r=8, lora_dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    with qt.force_backend("triton"):
        counts = _eval_counts(layer, torch.randn(m, 128, dtype=torch.bfloat16, device=device))
    assert sum(counts.values()) == 2 and counts.get("aten.mm") == 1, dict(counts)


# -- the benchmark script ----------------------------------------------------------
def test_bench_host_smoke(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_host.py"), "--smoke", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    cases = [row["case"] for row in doc["rows"]]
    assert cases == ["nf4_matmul vs F.linear", "Linear4bit vs nn.Linear", "LoRALinear4bit vs nn.Linear+LoRA"]
    for row in doc["rows"]:
        assert row["host_us"] > 0 and row["dense_host_us"] > 0
        assert row["ratio"] == pytest.approx(row["host_us"] / row["dense_host_us"])
        assert row["launches"] == sum(row["ops"].values()) >= 1 and row["dense_launches"] >= 1
    assert any(k.startswith("triton.") for k in doc["rows"][0]["ops"])  # the stubbed launch is counted
    assert f"{doc['rows'][-1]['ratio']:.2f}x" in proc.stdout
    assert doc["setup"]["command"].startswith("benchmarks/bench_host.py --smoke")
