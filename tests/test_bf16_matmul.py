"""The fine-tune's bf16-matmuls-in-fp32 mode (qlora_triton.finetune.bf16_matmul).

Inside the mode a bf16 CPU matmul must give the fp32 product of its bf16
operands rounded once to bf16 (what a bf16 GEMM with fp32 accumulation
computes), in every form the training steps call (functional, in place into a
strided slice, ``out=``, batched, attention forward and backward); nothing bf16
may reach a native matmul kernel; other dtypes and mixed dtypes pass through
untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_triton.finetune import bf16_matmul as BM

BF16 = torch.bfloat16


def rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(BF16)


def operands(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(BF16) for s in shapes]


class BF16MatmulRecorder(TorchDispatchMode):
    """Records every matmul-family or attention op that runs with bf16 operands."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BM.MATMUL_OPS or func in BM.ATTENTION_OPS:
            if any(isinstance(a, torch.Tensor) and a.dtype == BF16 for a in (*args, *kwargs.values())):
                self.seen.append(str(func))
        return func(*args, **kwargs)


def test_each_form_is_the_fp32_product_rounded_once():
    a, b, c, bt = operands((33, 70), (70, 19), (33, 19), (19, 70))
    x, y, z = operands((3, 9, 40), (3, 40, 11), (3, 9, 11), seed=1)
    with BM.Bf16MatmulInFp32() as mode:
        mm = a @ b
        addmm = torch.addmm(c, a, b, beta=0.5, alpha=2.0)
        wide = torch.zeros(33, 40, dtype=BF16)
        wide[:, 3:22].addmm_(a, bt.t(), alpha=0.25)  # in place into a strided slice, as the fused MLP does
        out = torch.empty(33, 19, dtype=BF16)
        torch.mm(a, b, out=out)
        bmm = torch.bmm(x, y)
        baddbmm = torch.baddbmm(z, x, y, alpha=3.0)
        linear = F.linear(a, bt)
    for got in (mm, addmm, wide, out, bmm, baddbmm, linear):
        assert got.dtype == BF16
    af, bf, cf, btf = a.float(), b.float(), c.float(), bt.float()
    assert torch.equal(mm, rounded(af @ bf))
    assert torch.equal(addmm, rounded(torch.addmm(cf, af, bf, beta=0.5, alpha=2.0)))
    assert torch.equal(wide[:, 3:22], rounded(0.25 * (af @ btf.t())))
    assert not wide[:, :3].any() and not wide[:, 22:].any()
    assert torch.equal(out, rounded(af @ bf))
    assert torch.equal(bmm, rounded(x.float() @ y.float()))
    assert torch.equal(baddbmm, rounded(torch.baddbmm(z.float(), x.float(), y.float(), alpha=3.0)))
    assert torch.equal(linear, rounded(af @ btf.t()))
    for op in ("aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.mm.out",
               "aten.bmm.default", "aten.baddbmm.default"):
        assert mode.counts.get(op, 0) >= 1, op
    # torch's native bf16 kernels also accumulate in fp32: the two differ in the order of the sums only
    ref = a.double() @ b.double()
    for got in (mm, a @ b):
        assert ((got.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-2).all()


def test_attention_forward_and_backward():
    q, k, v = (t.requires_grad_() for t in operands((2, 3, 24, 16), (2, 3, 24, 16), (2, 3, 24, 16), seed=2))
    mask = torch.zeros(24, 24, dtype=BF16).masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1),
                                                       float("-inf"))
    grad = operands((2, 3, 24, 16), seed=3)[0]
    with BM.Bf16MatmulInFp32() as mode:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(grad)
    assert out.dtype == BF16 and all(t.grad.dtype == BF16 for t in (q, k, v))
    assert mode.counts.get("aten._scaled_dot_product_flash_attention_for_cpu.default") == 1
    assert mode.counts.get("aten._scaled_dot_product_flash_attention_for_cpu_backward.default") == 1
    # against fp32 attention of the same operands
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask.float())
    ref.backward(grad.float())
    assert torch.equal(out, rounded(ref.detach()))
    for t, t32 in ((q, q32), (k, k32), (v, v32)):
        assert torch.allclose(t.grad.float(), t32.grad, rtol=2**-7, atol=1e-2)


def test_other_dtypes_and_mixed_operands_pass_through():
    a32, b32 = torch.randn(8, 8), torch.randn(8, 8)
    a16 = a32.to(BF16)
    with BM.Bf16MatmulInFp32() as mode:
        assert torch.equal(a32 @ b32, torch.mm(a32, b32))
        with pytest.raises(RuntimeError):  # torch's own dtype check, as without the mode
            torch.mm(a16, b32)
    assert mode.counts == {}


def test_a_lora_step_runs_no_bf16_matmul_natively():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=97, use_cache=False,
                                      attn_implementation="sdpa")
    base = transformers.LlamaForCausalLM(config).to(BF16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                         "down_proj"]))
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    native = model(input_ids=ids, labels=ids).loss
    native.backward()
    native_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    with BM.Bf16MatmulInFp32() as mode, BF16MatmulRecorder() as recorder:
        # (the recorder, entered last, sees each op before the mode widens it)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert recorder.seen, "the step ran no bf16 matmul: nothing was tested"
    assert sum(mode.counts.values()) == len(recorder.seen)  # every one of them widened
    assert loss.dtype == native.dtype
    assert abs(loss.item() - native.item()) <= 1e-2 * abs(native.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for g, n in zip(grads, native_grads):
        assert torch.allclose(g.float(), n.float(), rtol=5e-2, atol=5e-2 * n.abs().max().item())


def test_resolve(monkeypatch):
    monkeypatch.setattr(BM, "native_bf16_supported", lambda: False)
    assert BM.resolve("auto", "cpu") == "fp32"
    monkeypatch.setattr(BM, "native_bf16_supported", lambda: True)
    assert BM.resolve("auto", "cpu") == "native"
    assert BM.resolve("native", "cpu") == "native" and BM.resolve("fp32", "cpu") == "fp32"
    assert BM.resolve("auto", "cuda") == "native"  # a GPU run keeps its bf16 kernels
    with pytest.raises(ValueError, match="CPU"):
        BM.resolve("fp32", "cuda")
    with pytest.raises(ValueError, match="bf16_matmul"):
        BM.resolve("fast", "cpu")
