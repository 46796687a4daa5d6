"""The fine-tune CLI refuses bad arguments in the parent process, before any
work (one line, exit 2), and takes non-LLaMA models (tiny, no hub)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qlora_triton.cli import main as cli_main
from qlora_triton.finetune import presets
from qlora_triton.finetune.model import lora_targets

transformers = pytest.importorskip("transformers")


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "qlora_triton.cli", "finetune", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_missing_model_folder_is_one_line_exit_2(tmp_path):
    proc = run_cli("--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "model:" in proc.stderr and "config.json" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("args, word", [
    (["--data", "missing.jsonl"], "data: no such file"),
    (["--steps", "0"], "steps"),
    (["--dropout", "1.5"], "dropout"),
    (["--device", "tpu"], "device"),
])
def test_bad_arguments_are_refused_before_work(tmp_path, capsys, args, word):
    assert cli_main(["finetune", "--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert word in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_big_preset_refuses_on_the_cpu_by_its_time_estimate(monkeypatch, capsys):
    monkeypatch.setattr(presets, "available_bytes", lambda device: 2**50)  # memory is not the limit
    assert cli_main(["finetune", "--preset", "7b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "minutes on the CPU" in err and "7b" in err
    assert presets.estimate_cpu_seconds(presets.LLAMA_SHAPES["tiny"], 2, 64, 4) < presets.CPU_SECONDS_LIMIT


@pytest.mark.parametrize("config, expected", [
    (lambda: transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32),
     ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
      "transformer.h.0.mlp.c_proj"]),
    (lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64),
     ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense",
      "gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"]),
])
def test_lora_targets_of_non_llama_models(config, expected):
    model = transformers.AutoModelForCausalLM.from_config(config())
    assert sorted(lora_targets(model)) == sorted(expected)
    with pytest.raises(ValueError, match="no linear layer"):
        lora_targets(torch.nn.Sequential(torch.nn.Embedding(4, 4)))
