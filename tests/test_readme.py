"""The documentation's examples run as written on the CPU.

README.md and every docs/*.md page are read; a page runs the python blocks that
carry the marker ``<!-- readme-snippets``: all of its blocks when the marker
comes before its first ``## `` heading, else those of each ``## `` section
whose text holds it (other blocks, e.g. CUDA-only ones, are illustrations).
Each page's blocks run in order, as one script in one fresh process, in a
temporary folder.
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


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def marked_blocks(page: Path) -> list[str]:
    """The blocks of ``page`` that the marker selects (see the module docstring)."""
    text = page.read_text()
    head, *sections = re.split(r"(?m)^(?=## )", text)
    if MARKER in head:
        return python_blocks(text)
    return [block for section in sections if MARKER in section for block in python_blocks(section)]


TESTED = {page.relative_to(ROOT).as_posix(): blocks for page in PAGES if (blocks := marked_blocks(page))}


def test_the_recipes_page_and_the_fine_tuning_section_are_tested():
    assert len(TESTED.get("docs/recipes.md", [])) >= 5
    # the fine-tuning walk-through, wherever the lead's restructuring puts it
    assert any("replace_linear" in "".join(blocks) and "SFTTrainer" in "".join(blocks)
               for page, blocks in TESTED.items() if page != "docs/recipes.md")


def test_the_marker_selects_sections_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n## A\n\n```python\nA\n```\n\n## B\n" + MARKER + " -->\n\n```python\nB\n```\n")
    assert marked_blocks(page) == ["B\n"]
    page.write_text("# T\n" + MARKER + " -->\n\n## A\n\n```python\nA\n```\n\n## B\n\n```python\nB\n```\n")
    assert marked_blocks(page) == ["A\n", "B\n"]


@pytest.mark.parametrize("page", sorted(TESTED))
def test_page_examples_run_on_the_cpu(page, tmp_path):
    script = tmp_path / "examples.py"
    script.write_text("\n".join(TESTED[page]) + "\nprint('EXAMPLES OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the plain-torch reference on the CPU, as a user's run
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("EXAMPLES OK")
