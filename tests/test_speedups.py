"""The one place that decides the QLoRA options (finetune/speedups.py) and the
CLI plumbing of --fuse / --liger / --offload."""

from __future__ import annotations

import pytest

import qlora_triton as qt
from qlora_triton.cli import main as cli_main
from qlora_triton.finetune import speedups


def test_resolve_defaults_and_refusals():
    chosen = speedups.resolve()
    assert chosen == speedups.Speedups(fuse=None, liger=True, offload=False)
    assert speedups.resolve(liger=False, offload=True).names() == ["fuse", "offload"]
    assert speedups.resolve(fuse=False, liger=False).names() == []
    with pytest.raises(TypeError, match="liger"):
        speedups.resolve(liger="yes")
    with pytest.raises(TypeError, match="speedups"):
        speedups.apply(None, {"liger": True})


def test_cli_passes_the_flags_as_given(monkeypatch):
    import qlora_triton.finetune as F

    seen = {}
    monkeypatch.setattr(F, "run", lambda config: seen.setdefault("config", config) and {"plot": "p"})
    monkeypatch.setattr(F, "run_preset", lambda name, **kw: seen.setdefault("preset", kw))
    assert cli_main(["finetune", "--device", "cpu", "--output-dir", "o", "--no-liger", "--offload"]) == 0
    config = seen["config"]
    assert (config.fuse, config.liger, config.offload) == (None, False, True)
    config.resolve()
    assert (config.fuse, config.liger, config.offload) == (None, False, True)
    assert cli_main(["finetune", "--preset", "tiny", "--no-fuse", "--liger"]) == 0
    kw = seen["preset"]
    assert (kw["fuse"], kw["liger"], kw["offload"]) == (False, True, None)
