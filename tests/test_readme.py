"""The README's fine-tuning section runs as written on the CPU: every python
block of it, in order, in one fresh process in a temporary folder."""

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


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## QLoRA fine-tuning"):]
    section = section[:section.index("\n## ", 3)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_fine_tuning_section_runs_on_the_cpu(tmp_path):
    blocks = readme_blocks()
    assert len(blocks) >= 5
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + "\nprint('README OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the plain-torch reference on the CPU, as a user's run
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("README OK")
