"""The small LLaMA-style model of the default run, and loading a local one.

The default is a ``transformers.LlamaForCausalLM`` built from a config with
random weights (no download): the same blocks as LLaMA (RMSNorm, rotary
attention, SwiGLU MLP), only small enough to train on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..extras import require

FEATURE = "qlora-triton finetune"

# The linear layers of a LLaMA block: LoRA goes on all of them (the QLoRA
# paper's choice), never on the output head.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_size: int
    max_position_embeddings: int = 2048
    num_key_value_heads: int | None = None  # grouped-query attention; None: one per head

    @property
    def kv_size(self) -> int:
        """Output features of k_proj and v_proj."""
        heads = self.num_key_value_heads or self.num_attention_heads
        return self.hidden_size * heads // self.num_attention_heads


def llama_config(shape: ModelShape):
    LlamaConfig = require("transformers", FEATURE).LlamaConfig

    fields = asdict(shape)
    fields["num_key_value_heads"] = shape.num_key_value_heads or shape.num_attention_heads
    return LlamaConfig(**fields,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa")


def build_llama(shape: ModelShape, seed: int, device: torch.device | str = "cpu"):
    """A randomly initialised ``LlamaForCausalLM`` in fp32 (seeded)."""
    LlamaForCausalLM = require("transformers", FEATURE).LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape)).to(device)


def load_model(folder: str, dtype: torch.dtype, device: torch.device | str):
    """A local Hugging Face causal-LM folder (``config.json`` + weights)."""
    AutoModelForCausalLM = require("transformers", FEATURE).AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"model: {folder!r} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.config.use_cache = False
    return model.to(device)


def lora_targets(model) -> list[str]:
    """The LoRA targets: ``replace_linear``'s default (every linear layer but the
    output head, ``Conv1D`` included), as full module names, which PEFT takes too."""
    from ..convert import select_linears

    chosen, _ = select_linears(model, None)
    targets = [name for name, (_, kind) in chosen.items() if kind in ("linear", "conv1d")]
    if not targets:
        raise ValueError(f"model: a {type(model).__name__} has no linear layer besides its output head "
                         "to put LoRA on")
    return targets


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer (Linear4bit keeps its NF4 tensors as
    buffers): the weights' footprint; shared storage is counted once."""
    tensors = list(model.parameters()) + list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
