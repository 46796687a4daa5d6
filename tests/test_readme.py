"""The documented examples run as written on the CPU: the python blocks of
README.md and of every docs/*.md page that the marker ``<!-- readme-snippets``
selects, each page in one fresh process in a temporary folder (README.md's
after a tiny model written to "my-model", the folder its quick start names).

The marker before a page's first ``## `` heading selects all of its blocks;
inside a ``## `` section, that section's blocks. A page with python blocks and
no marker must be listed in ``ILLUSTRATIONS`` (fragments that need a GPU or a
model in scope), so that no page drops out of the test unnoticed.
"""

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
MARKER = "<!-- readme-snippets"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# pages whose python blocks are fragments, not run
ILLUSTRATIONS = {"docs/decode.md", "docs/distributed.md", "docs/fused.md", "docs/matmul.md",
                 "docs/optimizers.md", "docs/training-memory.md"}

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


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def marked_blocks(page: Path) -> list[str]:
    """The blocks of ``page`` that the marker selects (see the module docstring)."""
    text = page.read_text()
    head, *sections = re.split(r"(?m)^(?=## )", text)
    if MARKER in head:
        return python_blocks(text)
    return [block for section in sections if MARKER in section for block in python_blocks(section)]


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUN = {name(page): blocks for page in PAGES if (blocks := marked_blocks(page))}


def test_every_page_with_python_is_run_or_an_illustration():
    unmarked = {name(p) for p in PAGES if python_blocks(p.read_text()) and name(p) not in RUN}
    assert unmarked <= ILLUSTRATIONS, f"mark these pages ({MARKER} -->) or list them in ILLUSTRATIONS: " \
                                      f"{sorted(unmarked - ILLUSTRATIONS)}"
    assert "README.md" in RUN and len(RUN.get("docs/recipes.md", [])) >= 5


def test_the_marker_selects_pages_and_sections(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n## A\n\n```python\nA\n```\n\n## B\n" + MARKER + " -->\n\n```python\nB\n```\n")
    assert marked_blocks(page) == ["B\n"]
    page.write_text("# T\n" + MARKER + " -->\n\n## A\n\n```python\nA\n```\n\n## B\n\n```python\nB\n```\n")
    assert marked_blocks(page) == ["A\n", "B\n"]


@pytest.mark.parametrize("page", sorted(RUN))
def test_page_runs_on_the_cpu(page, tmp_path):
    source = (TINY_MODEL if page == "README.md" else "") + "\n".join(RUN[page])
    script = tmp_path / "doc.py"
    script.write_text(source + "\nprint('DOC OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the plain-torch reference on the CPU, as a user's run
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("DOC OK")
