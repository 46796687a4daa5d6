"""Which optional extra a feature needs, and the one-line error when it is missing.

The kernels, layers and optimizers need only the core dependencies. The
Hugging Face features (``NF4Config``, ``from_pretrained``,
``merge_and_quantize``, the PEFT integration, ``qlora-triton finetune``) need
the ``[hf]`` extra: ``pip install "qlora_triton[hf]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra that installs it
EXTRA_OF = {"transformers": "hf", "peft": "hf", "accelerate": "hf", "matplotlib": "hf"}


class MissingExtraError(ModuleNotFoundError):
    """A feature's optional package is not installed; the message names the extra."""


def missing_extra_message(module: str, feature: str) -> str:
    """The one line a user sees: what needs which package, and the install command."""
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    how = f'pip install "qlora_triton[{extra}]"' if extra else f"pip install {top}"
    return f"{feature} needs the {top!r} package, which is not installed: {how}"


def require(module: str, feature: str) -> ModuleType:
    """``import module``, or a ``MissingExtraError`` saying which extra installs it
    (only when ``module`` itself is missing: an error inside it propagates)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingExtraError(missing_extra_message(module, feature), name=e.name) from None
