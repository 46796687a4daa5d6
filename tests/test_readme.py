"""The documented recipes run as written on the CPU: the README's quick start
(on a tiny model it first writes to "my-model") and every python block of
docs/finetune.md, each page in one fresh process in a temporary folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

for name in ("transformers", "peft", "trl", "datasets"):
    pytest.importorskip(name)
ROOT = Path(__file__).resolve().parent.parent

# A tiny random Llama and a word-level tokenizer, written where the README's
# quick start expects "any local Hugging Face causal-LM folder".
TINY_MODEL = '''
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
transformers.LlamaForCausalLM(config).save_pretrained("my-model")
words = ["<pad>", "<eos>", "<unk>", "the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(120)]
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                     unk_token="<unk>").save_pretrained("my-model")
'''


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_script(tmp_path: Path, source: str) -> None:
    script = tmp_path / "doc.py"
    script.write_text(source + "\nprint('DOC OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the plain-torch reference on the CPU, as a user's run
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("DOC OK")


def test_readme_quick_start_runs_on_the_cpu(tmp_path):
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) == 1, "the README carries one python block, the quick start"
    check = ("import pathlib\nassert pathlib.Path('adapter/adapter_model.safetensors').exists()\n"
             "assert isinstance(model, peft.PeftModel)\n")
    run_script(tmp_path, TINY_MODEL + blocks[0] + check)


def test_finetune_page_runs_on_the_cpu(tmp_path):
    blocks = python_blocks(ROOT / "docs" / "finetune.md")
    assert len(blocks) >= 5
    run_script(tmp_path, "\n".join(blocks))
