"""The fine-tune on several ranks: the per-rank memory estimate, and the
README's ``torchrun`` command on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_triton.cli import main as cli_main
from qlora_triton.finetune import presets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "7b", "70b"])
def test_linear_and_lora_counts_match_the_transformers_model(name):
    from transformers import LlamaForCausalLM

    from qlora_triton.finetune.model import LLAMA_LINEARS, llama_config

    shape = presets.LLAMA_SHAPES[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_LINEARS]
    assert sum(m.weight.numel() for m in linears) == presets.linear_params(shape)
    r = 8
    assert sum(r * (m.in_features + m.out_features) for m in linears) == presets.lora_params(shape, r)


def test_estimate_shards_the_base_and_counts_ranks():
    shape = presets.LLAMA_SHAPES["70b"]
    one, two = (presets.estimate_bytes(shape, 8, 1, 512, w) for w in (1, 2))
    assert two["nf4_weights"] == pytest.approx(one["nf4_weights"] / 2, abs=1)
    assert two["lora_and_adam"] == pytest.approx(one["lora_and_adam"] / 2, abs=1)
    assert two["gathered_layers"] > 0 and "gathered_layers" not in one
    assert two["total"] < one["total"]
    # 70B (LLaMA-2 shapes) in NF4: two 24 GiB GPUs, as FSDP-QLoRA showed; one 80 GiB GPU.
    assert presets.ranks_needed(shape, 24 * 2**30) == 2
    assert presets.ranks_needed(shape, 80 * 2**30) == 1
    assert presets.ranks_needed(shape, 2**20) is None
    with pytest.raises(ValueError, match="world_size"):
        presets.estimate_bytes(shape, 8, 1, 512, 0)


def test_cli_estimate(capsys):
    assert cli_main(["finetune", "--preset", "70b", "--estimate", "--rank-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fewest ranks of 24\.0 GiB: 2\b", out), out
    assert cli_main(["finetune", "--estimate"]) == 2
    assert "give --preset NAME" in capsys.readouterr().err
    assert cli_main(["finetune", "--preset", "7b", "--estimate", "--rank-memory", "-1"]) == 2
    assert "--rank-memory" in capsys.readouterr().err


def test_torchrun_two_ranks_on_cpu(tmp_path):
    """The README's command, at a toy size: each rank prints its share of the
    NF4 base (half of it), the loss is finite, the adapter is saved once."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "qlora_triton.finetune", "--steps", "3", "--pretrain-steps", "0", "--batch-size", "4",
           "--seq-len", "32", "--output-dir", str(out), "--save-adapter", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = re.findall(r"rank (\d)/2: NF4 base ([\d,]+) of ([\d,]+) bytes", proc.stderr)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], proc.stderr[-2000:]
    local = [int(x.replace(",", "")) for _, x, _ in lines]
    total = int(lines[0][2].replace(",", ""))
    assert sum(local) == total and max(local) <= total / 2 + 1024  # half each, within a row per tensor
    summary = json.loads((out / "summary-multirank.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert len(summary["train_loss"]) == 3
    assert all(torch.isfinite(torch.tensor(summary["train_loss"])))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
