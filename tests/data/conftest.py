"""Fixtures for the data tests: a word-level toy tokenizer and an in-memory source that counts reads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill.data.sources import Source, check_split, in_split

WORDS = ["[UNK]", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g"]


def toy_tokenizer(bos: bool = True, words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids = positions in `words` ("<s>" 1, "</s>" 2, "a" 3, ...)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", **specials)


class ListSource(Source):
    """Documents from a list, split by document hash; counts how often its documents are read."""

    def __init__(self, docs: list[str], heldout_percent: float = 0.0) -> None:
        self.docs, self.heldout_percent, self.reads = docs, heldout_percent, 0

    def fingerprint(self) -> str:
        return f"list({hashlib.sha256(repr(self.docs).encode()).hexdigest()[:12]}, {self.heldout_percent})"

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        self.reads += 1
        return (d for d in self.docs if in_split(d, split, self.heldout_percent))


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return toy_tokenizer()
