"""Registration with transformers and PEFT, without importing them.

transformers learns our quantizer (``hf_quantizer``) and PEFT our LoRA layer
(``peft_integration``) when ``qlora_triton`` is imported; importing those
libraries here would add seconds to every ``import qlora_triton`` (measured: 3 s
for transformers' quantizers, 7 s for PEFT), so each registration runs when its
library module is first imported, or at once if it already is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# library module -> our module whose import registers with it
HOOKS = {
    "transformers.quantizers.auto": "qlora_triton.hf_quantizer",
    "peft.tuners.lora.model": "qlora_triton.peft_integration",
}


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the library module's own loader, then imports our module."""

    def __init__(self, loader: importlib.abc.Loader, ours: str) -> None:
        self.loader, self.ours = loader, ours

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        importlib.import_module(self.ours)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        ours = HOOKS.get(fullname)
        if ours is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader, ours)
                return spec
        return None


def install() -> None:
    for library, ours in HOOKS.items():
        if library in sys.modules:
            importlib.import_module(ours)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
