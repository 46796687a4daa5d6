"""save_adapter is atomic (a kill -9 at any moment leaves the old adapter or the
new one, never a mix, and no stray files); load_adapter names the file it
cannot read."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

import qlora_triton as qt

pytest.importorskip("safetensors")


def _model(alpha: float, seed: int) -> nn.Module:
    torch.manual_seed(1234)  # the same base weights for every version
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    for i in (0, 2):
        model[i] = qt.LoRALinear4bit.from_linear(model[i], r=4, lora_alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in (0, 2):
            model[i].lora_A.weight.copy_(torch.randn(model[i].lora_A.weight.shape, generator=gen))
            model[i].lora_B.weight.copy_(torch.randn(model[i].lora_B.weight.shape, generator=gen))
    return model


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((m.lora_alpha, m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())
                 for m in (model[0], model[2]))


def _same(a: tuple, b: tuple) -> bool:
    return all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))


def _strays(folder) -> list[str]:
    parent, name = os.path.split(os.path.abspath(folder))
    return [e for e in os.listdir(parent) if e != name]


def test_save_survives_sigkill_at_any_moment(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    folder = tmp_path / "adapter"
    versions = {"old": _model(8.0, seed=1), "new": _model(16.0, seed=2)}
    prints = {k: _fingerprint(m) for k, m in versions.items()}
    (folder).mkdir()
    (folder / "README.md").write_text("the user's own file")
    qt.save_adapter(versions["old"], folder)
    target = _model(1.0, seed=3)  # load_adapter overwrites every adapter value in place
    rng = random.Random(0)
    seen, current, mid_save = set(), "old", 0
    for _ in range(40):
        pid = os.fork()
        if pid == 0:  # child: save over the adapter again and again until killed,
            try:      # the version the folder does not hold first
                order = ("new", "old") if current == "old" else ("old", "new")
                while True:
                    for key in order:
                        qt.save_adapter(versions[key], folder)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_save += bool(_strays(folder))  # a hidden sibling: the kill landed inside a save
        assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert (folder / "README.md").read_text() == "the user's own file"
        loaded = _fingerprint(qt.load_adapter(target, folder))
        match = [k for k, p in prints.items() if _same(loaded, p)]
        assert len(match) == 1, "the folder holds a mix of two adapters"
        current = match[0]
        seen.add(current)
    assert seen == {"old", "new"} and mid_save > 0, f"the kills never landed mid-save: {seen}, {mid_save}"
    # Leftovers of killed saves are only hidden siblings, and the next save removes them.
    qt.save_adapter(versions["new"], folder)
    assert _strays(folder) == []
    assert _same(_fingerprint(qt.load_adapter(target, folder)), prints["new"])


def test_failing_weights_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    import safetensors.torch

    folder = tmp_path / "adapter"
    old, new = _model(8.0, seed=1), _model(16.0, seed=2)
    qt.save_adapter(old, folder)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        qt.save_adapter(new, folder)
    assert _strays(folder) == []
    assert _same(_fingerprint(qt.load_adapter(_model(1.0, seed=3), folder)), _fingerprint(old))


def test_first_save_creates_the_folder(tmp_path):
    folder = tmp_path / "a" / "b"
    qt.save_adapter(_model(8.0, seed=1), folder)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "config-list", "config-json"])
def test_load_names_the_unreadable_file(tmp_path, damage):
    folder = tmp_path / "adapter"
    qt.save_adapter(_model(8.0, seed=1), folder)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        bad = weights
    elif damage == "garbage":
        weights.write_bytes(os.urandom(300))
        bad = weights
    elif damage == "config-list":
        config.write_text(json.dumps([1, 2]))
        bad = config
    else:
        config.write_text("{oops")
        bad = config
    with pytest.raises(ValueError, match=str(bad)):
        qt.load_adapter(_model(1.0, seed=3), folder)


def test_save_through_a_symlinked_folder(tmp_path):
    real = tmp_path / "real"
    qt.save_adapter(_model(8.0, seed=1), real)
    link = tmp_path / "link"
    link.symlink_to(real)
    new = _model(16.0, seed=2)
    qt.save_adapter(new, link)
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert _same(_fingerprint(qt.load_adapter(_model(1.0, seed=3), real)), _fingerprint(new))
