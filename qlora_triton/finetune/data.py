"""The bundled tasks and the token streams the loops read.

Nothing is downloaded: both tasks are generated here from a tiny grammar, with
a seeded ``random.Random``, so every run sees the same text.

* Task 1, "pre-training": active sentences, ``the old cat chases a red fox .``
* Task 2, "fine-tuning": the same words in a new construction the model has
  never seen, passive voice with a time phrase,
  ``a red fox was chased by the old cat at dawn .``: new function words
  (``was``, ``by``, ``at``), new verb forms (participles) and a new word order.
  The pre-trained model already spells the nouns and adjectives, so the task is
  related; the new template is what fine-tuning has to learn, and it does:
  on the default CPU run (2026-12-04) the held-out loss falls from about 2.45
  to about 1.2 in 100 LoRA steps.

The text is tokenized per character over printable ASCII, so the bundled
model can also read a user's ``--data`` file. A Hugging Face model folder
brings its own tokenizer instead (:class:`HFTokenizer`).

Packing. Training windows are cut from one long stream, so a window holds
the end of one sentence, whole sentences and the start of another. Each
line (a newline token ends it) is its own sequence: :meth:`TokenStream.batch_inputs`
gives per-sequence ``position_ids`` (0 at each sequence's first token) and
labels of -100 on each sequence's first token, the format of transformers'
``DataCollatorWithFlattening``. From the position ids, transformers' sdpa
and eager attention mask attention across sequence boundaries (its
``find_packed_sequence_indices``, when no attention mask and no cache is
passed: the inputs say ``use_cache=False``), so no token attends to, or is
predicted from, another sentence. Held-out windows are scored packed the
same way.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

DETERMINERS = ("the", "a", "one", "every")
ADJECTIVES = ("red", "old", "big", "small", "quick", "lazy", "green", "young", "tall", "shy", "brown", "loud")
NOUNS = ("cat", "dog", "fox", "bird", "fish", "horse", "mouse", "frog", "goat", "owl", "bear", "wolf")
# (present tense, past participle)
VERBS = (("sees", "seen"), ("chases", "chased"), ("eats", "eaten"), ("finds", "found"),
         ("likes", "liked"), ("helps", "helped"), ("follows", "followed"), ("hears", "heard"))
TIMES = ("at dawn", "at noon", "at night", "today", "in spring", "in winter")


def _noun_phrase(rng: random.Random) -> str:
    return f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def task1_sentence(rng: random.Random) -> str:
    """Active voice: ``<np> <verb> <np> .``"""
    return f"{_noun_phrase(rng)} {rng.choice(VERBS)[0]} {_noun_phrase(rng)} ."


def task2_sentence(rng: random.Random) -> str:
    """Passive voice with a time phrase: ``<np> was <participle> by <np> <time> .``"""
    return f"{_noun_phrase(rng)} was {rng.choice(VERBS)[1]} by {_noun_phrase(rng)} {rng.choice(TIMES)} ."


def task_text(task: int, n_sentences: int, seed: int) -> str:
    """``n_sentences`` of task 1 or 2, one per line, from ``seed``."""
    if task not in (1, 2):
        raise ValueError(f"task must be 1 or 2, got {task!r}")
    make = task1_sentence if task == 1 else task2_sentence
    rng = random.Random(seed)
    return "".join(make(rng) + "\n" for _ in range(n_sentences))


class CharTokenizer:
    """One id per printable ASCII character and newline; anything else -> ``unk``."""

    def __init__(self) -> None:
        self.chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.unk_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in ids)


class HFTokenizer:
    """A Hugging Face model folder's own tokenizer, behind the same two names."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(folder)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._tok.decode(ids)


def read_text_file(path: str) -> str:
    """A local ``.txt`` file, or ``.jsonl`` with a ``"text"`` field per line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data: {path!r} is not a file")
    if p.suffix == ".jsonl":
        lines = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"data: line {i + 1} of {path!r} has no string 'text' field")
            lines.append(record["text"] + "\n")
        return "".join(lines)
    if p.suffix == ".txt":
        return p.read_text(encoding="utf-8")
    raise ValueError(f"data: expected a .txt or .jsonl file, got {path!r}")


def split_text(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Train / held-out split at a line boundary near the end."""
    cut = int(len(text) * (1.0 - eval_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def separator_id(tokenizer) -> int | None:
    """The token that ends a line (a sequence), or None when a newline is not
    one token of ``tokenizer`` (then nothing is packed)."""
    ids = tokenizer.encode("\n")
    return ids[0] if len(ids) == 1 else None


def packed_inputs(batch: torch.Tensor, separator: int | None) -> dict:
    """Model inputs for ``batch`` [B, S] whose rows hold several sequences,
    each ended by ``separator``: ``position_ids`` restart at 0 after every
    separator and the first token of each sequence is labelled -100 (it is
    not predicted from the previous sequence), as transformers'
    ``DataCollatorWithFlattening`` lays out a packed batch. ``separator``
    None: one sequence per row (plain inputs)."""
    if separator is None:
        return {"input_ids": batch, "labels": batch, "use_cache": False}
    starts = torch.zeros_like(batch, dtype=torch.bool)
    starts[:, 1:] = batch[:, :-1] == separator  # a sequence starts after each separator
    starts[:, 0] = True
    index = torch.arange(batch.shape[1], device=batch.device).expand_as(batch)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    labels = batch.masked_fill(starts, -100)
    return {"input_ids": batch, "labels": labels, "position_ids": index - first, "use_cache": False}


@dataclass
class TokenStream:
    """One long run of token ids; training reads random windows of it."""

    ids: torch.Tensor  # int64 [n]
    separator: int | None = None  # the token that ends each sequence: training packs (see packed_inputs)

    @classmethod
    def from_text(cls, text: str, tokenizer) -> "TokenStream":
        return cls(torch.tensor(tokenizer.encode(text), dtype=torch.long), separator_id(tokenizer))

    def check(self, seq_len: int, name: str) -> None:
        if self.ids.numel() < seq_len + 1:
            raise ValueError(f"{name}: {self.ids.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}")

    def batch_starts(self, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """int64 ``[steps, batch_size]`` window starts from ``seed``: the data order.

        Drawn once and shared by every phase, so QLoRA and 16-bit LoRA see the
        same batches in the same order."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.ids.numel() - seq_len, (steps, batch_size), generator=gen)

    def batch(self, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
        """int64 ``[len(starts), seq_len]``; labels are the inputs (the model shifts them)."""
        offsets = torch.arange(seq_len)
        return self.ids[starts[:, None] + offsets[None, :]]

    def batch_inputs(self, starts: torch.Tensor, seq_len: int) -> dict:
        """The model inputs of :meth:`batch`'s windows, packed per sequence
        (:func:`packed_inputs`)."""
        return packed_inputs(self.batch(starts, seq_len), self.separator)

    def eval_batches(self, seq_len: int, batch_size: int, max_windows: int) -> list[torch.Tensor]:
        """Non-overlapping windows from the start, at most ``max_windows``, in batches."""
        n = min((self.ids.numel() - 1) // seq_len, max_windows)
        if n == 0:
            raise ValueError(f"held-out data has {self.ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.arange(n) * seq_len
        return [self.batch(starts[i:i + batch_size], seq_len) for i in range(0, n, batch_size)]
