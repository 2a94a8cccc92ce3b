import json

import numpy as np
import pytest

from distill.data.tokens import (
    cached_stream,
    encode_batch,
    token_cache_dir,
    token_dtype,
    tokenizer_fingerprint,
)
from tests.data.conftest import ListSource, toy_tokenizer

DOCS = ["a b", "c", "", "d e a", "zz g"]


def test_each_document_starts_with_bos(tmp_path, tok):
    stream = cached_stream(tmp_path, "all", ListSource(DOCS), tok)
    # "" has no ids and is skipped; unknown words map to [UNK] = 0
    assert stream.array().tolist() == [1, 3, 4, 1, 5, 1, 6, 7, 3, 1, 0, 9]
    assert stream.dtype == "uint16" and stream.num_tokens == 12


def test_without_bos_each_document_ends_with_eos(tmp_path):
    stream = cached_stream(tmp_path, "all", ListSource(DOCS[:4]), toy_tokenizer(bos=False))
    assert stream.array().tolist() == [3, 4, 2, 5, 2, 6, 7, 3, 2]


def test_batched_encode_equals_encode_one_by_one(tok):
    texts = ["a b c", "g f e d", "", "a  a\nb"]
    assert encode_batch(tok, texts) == [tok.encode(t, add_special_tokens=False) for t in texts]


def test_meta_records_tokenizer_source_split_and_count(tmp_path, tok):
    source = ListSource(DOCS)
    stream = cached_stream(tmp_path, "train", source, tok)
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert (meta["source"], meta["split"], meta["num_tokens"], meta["dtype"]) == (source.fingerprint(), "train", 12, "uint16")
    assert stream.path.stat().st_size == 12 * 2


def test_second_build_reads_the_cache_not_the_source(tmp_path, tok):
    source = ListSource(DOCS)
    directory = token_cache_dir(tmp_path, source, tok)
    first = cached_stream(directory, "train", source, tok)
    second = cached_stream(directory, "train", source, tok)
    assert source.reads == 1
    assert np.array_equal(first.array(), second.array())


def test_cache_dir_is_keyed_by_source_and_tokenizer(tmp_path, tok):
    base = token_cache_dir(tmp_path, ListSource(DOCS), tok)
    assert base.parent == tmp_path
    assert token_cache_dir(tmp_path, ListSource(DOCS[:2]), tok) != base
    assert token_cache_dir(tmp_path, ListSource(DOCS), toy_tokenizer(bos=False)) != base
    assert token_cache_dir(tmp_path, ListSource(DOCS), toy_tokenizer()) == base


def test_cache_of_another_tokenizer_is_refused(tmp_path, tok):
    cached_stream(tmp_path, "train", ListSource(DOCS), tok)
    other = toy_tokenizer(words=[*toy_tokenizer().get_vocab(), "h"][::-1])
    with pytest.raises(ValueError, match=f"{tokenizer_fingerprint(tok)}.*{tokenizer_fingerprint(other)}.*delete"):
        cached_stream(tmp_path, "train", ListSource(DOCS), other)


def test_cache_of_another_source_is_refused(tmp_path, tok):
    cached_stream(tmp_path, "train", ListSource(DOCS), tok)
    with pytest.raises(ValueError, match="holds source"):
        cached_stream(tmp_path, "train", ListSource(DOCS[:2]), tok)


def test_empty_source_names_source_and_split_and_leaves_nothing(tmp_path, tok):
    with pytest.raises(ValueError, match=r"empty data: source list\(.*split 'heldout'"):
        cached_stream(tmp_path, "heldout", ListSource(["", "  "]), tok)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_build_leaves_no_cache(tmp_path, tok):
    def failing():
        yield "a b"
        raise KeyboardInterrupt

    source = ListSource(DOCS)
    source.documents = lambda split: failing()
    with pytest.raises(KeyboardInterrupt):
        cached_stream(tmp_path, "train", source, tok)
    assert list(tmp_path.iterdir()) == []
    assert cached_stream(tmp_path, "train", ListSource(DOCS), tok).num_tokens == 12


class _BigVocab:
    """Tokenizer stand-in with 70,000 ids."""

    def __len__(self) -> int:
        return 70_000

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(70_000)}


def test_ids_beyond_uint16_use_uint32(tok):
    assert token_dtype(tok) == np.uint16
    assert token_dtype(_BigVocab()) == np.uint32


def test_tokenizer_fingerprint_follows_vocab_and_specials(tok):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(toy_tokenizer())
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(toy_tokenizer(bos=False))
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(toy_tokenizer(words=[*toy_tokenizer().get_vocab(), "h"]))
