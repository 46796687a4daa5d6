"""Small helpers several test files share (imported as ``helpers``: pytest puts
tests/ on sys.path, as for dist_pool)."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref`` in float64; a NaN fails."""
    out, ref = out.detach().double(), ref.detach().double()
    err = float((out - ref).norm() / ref.norm())
    assert err == err, "NaN in the output"
    return err


def tokens(vocab: int = 128) -> torch.Tensor:
    """A [2, 11] batch of random token ids (odd length on purpose)."""
    return torch.randint(0, vocab, (2, 11))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def word_tokenizer(words: int = 100):
    """A word-level fast tokenizer over "w0".."w{words-1}" (plus pad, eos, unk), built in
    memory: the trainers' tests need a tokenizer and no download."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(words)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")
