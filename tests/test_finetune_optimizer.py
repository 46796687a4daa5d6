"""qlora_triton/finetune/optimizer.py: every fine-tuning command (the phases,
the presets, the multi-rank run, the strategy memory) builds its PagedAdamW
through one helper that falls back to paged=False when the managed-memory
helper did not build, and says so."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import qlora_triton as qt
from qlora_triton import paged
from qlora_triton.finetune import optimizer

FINETUNE = pathlib.Path(optimizer.__file__).parent


def _missing_helper(path=None):
    raise paged.ManagedMemoryError("the managed-memory helper is not built (test)")


def test_can_page_on_cuda_follows_the_helper(monkeypatch, capsys):
    monkeypatch.setattr(paged, "helper", _missing_helper)
    assert optimizer.can_page(torch.device("cuda", 0)) is False
    assert "PagedAdamW with paged=False" in capsys.readouterr().err
    monkeypatch.setattr(paged, "helper", lambda path=None: object())
    assert optimizer.can_page(torch.device("cuda", 0)) is True
    assert capsys.readouterr().err == ""


def test_can_page_off_cuda_never_asks_for_the_helper(monkeypatch):
    monkeypatch.setattr(paged, "helper", lambda path=None: pytest.fail("helper asked off CUDA"))
    assert optimizer.can_page(torch.device("cpu")) is True
    assert optimizer.can_page(torch.device("meta")) is True


def test_paged_adamw_passes_the_fallback_and_settings(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    opt = optimizer.paged_adamw(params, lr=3e-4, betas=(0.8, 0.9))
    assert isinstance(opt, qt.PagedAdamW) and opt.paged is True
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    seen = []
    monkeypatch.setattr(optimizer, "can_page", lambda device: seen.append(device) or False)
    opt = optimizer.paged_adamw(iter(params), lr=1e-3)
    assert opt.paged is False and seen == [params[0].device]
    with pytest.raises(ValueError, match="params"):
        optimizer.paged_adamw([], lr=1e-3)


def test_no_finetune_module_builds_pagedadamw_itself():
    # One place decides paged or not: a direct qt.PagedAdamW(...) call elsewhere
    # in finetune/ would skip the fallback.
    direct = []
    for path in sorted(FINETUNE.glob("*.py")):
        if path.name == "optimizer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "PagedAdamW":
                direct.append(f"{path.name}:{node.lineno}")
    assert direct == []
