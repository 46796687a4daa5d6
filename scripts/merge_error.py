"""How far merging moves a model's outputs (docs/recipes.md, "Merging").

A Llama-shaped random model (4 layers, hidden 512, vocab 2048) converted by
``replace_linear`` (r 16), its adapters set as after training (B ~ N(0, 0.01)),
then merged three ways; each merged model's logits are compared with the
unmerged adapter model's, in the same compute dtype (fp32, then bf16):
relative error ||out - ref|| / ||ref||, the largest absolute difference, and the
share of positions whose top token changes. CPU, plain-torch backend.

    python scripts/merge_error.py
"""

from __future__ import annotations

import copy
import json

import torch
import transformers

import qlora_triton as qt


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                      num_key_value_heads=4, num_hidden_layers=4, vocab_size=2048)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    qt.replace_linear(model, r=16, lora_alpha=32, progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    x = torch.randint(0, 2048, (4, 64))
    variants = {
        "merge_adapter(dense=True) [fp32 weights]": qt.merge_adapter(copy.deepcopy(model), dense=True),
        "merge_adapter(dense=True, dtype=torch.bfloat16)":
            qt.merge_adapter(copy.deepcopy(model), dense=True, dtype=torch.bfloat16),
        "merge_adapter(dense=False) [requantized NF4]": qt.merge_adapter(copy.deepcopy(model), dense=False),
    }
    rows = []
    with qt.force_backend("torch"), torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            ref = copy.deepcopy(model).to(dtype)(input_ids=x).logits.double()
            for name, merged in variants.items():
                out = copy.deepcopy(merged).to(dtype)(input_ids=x).logits.double()
                rows.append({"compute": str(dtype).removeprefix("torch."), "merge": name,
                             "rel_err": float((out - ref).norm() / ref.norm()),
                             "max_abs": float((out - ref).abs().max()),
                             "top1_changed": float((out.argmax(-1) != ref.argmax(-1)).double().mean())})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
