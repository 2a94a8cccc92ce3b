"""Tokenize a source once, pack it into one token stream per split, cache it as a memmap.

Each document becomes [bos] + ids when the tokenizer has a BOS, else ids + [eos], so every
document boundary carries a separator token; the documents of a split are concatenated in
source order. The stream is stored under
cache_dir/<sha of source fingerprint>-<tokenizer fingerprint>/<split>.bin (uint16 when every id
fits, else uint32) beside <split>.json (meta: tokenizer, source, split, token count, dtype).
Both files are written to a temporary name and renamed, the meta last, so an interrupted run
never leaves a cache that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from distill.data.sources import Source

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 1
_BATCH_CHARS = 4_000_000  # documents handed to the tokenizer per encode_batch call
_BATCH_DOCUMENTS = 4096


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the sorted vocab and the BOS/EOS ids (which decide the separators)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha(json.dumps([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id]))[:16]


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def document_start_id(tokenizer: Any) -> int:
    """The token every document follows: BOS, or else EOS (the end of the document before)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(f"tokenizer {tokenizer_name(tokenizer)!r} has neither bos_token_id nor eos_token_id")
    return start


def token_dtype(tokenizer: Any) -> np.dtype:
    """uint16 when every id is below 2**16, else uint32."""
    max_id = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1) - 1
    return np.dtype(np.uint16 if max_id < 2**16 else np.uint32)


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """ids of each text without special tokens; HF fast tokenizers encode the batch in parallel."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def pack_document(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    """[bos] + ids when there is a BOS, else ids + [eos]."""
    return [bos, *ids] if bos is not None else [*ids, eos]


def _text_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def packed_batches(documents: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """The packed token stream, a batch of documents at a time; documents with no ids are skipped."""
    document_start_id(tokenizer)  # raises when there is no separator token at all
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for texts in _text_batches(documents):
        yield [t for ids in encode_batch(tokenizer, texts) if ids for t in pack_document(ids, bos, eos)]


@dataclass(frozen=True)
class TokenStream:
    """A cached packed token stream: the file, its dtype and length. Opens as a read-only memmap."""

    path: Path
    dtype: str
    num_tokens: int

    def array(self) -> np.memmap:
        """[num_tokens] token ids"""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def token_cache_dir(cache_dir: str | Path, source: Source, tokenizer: Any) -> Path:
    """cache_dir/<sha of the source fingerprint>-<tokenizer fingerprint>"""
    return Path(cache_dir) / f"{_sha(source.fingerprint())[:16]}-{tokenizer_fingerprint(tokenizer)}"


def write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """write(tmp) beside `path`, then rename tmp to `path`: readers see all of it or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _write_stream(path: Path, source: Source, split: str, tokenizer: Any, dtype: np.dtype) -> int:
    count = 0
    with open(path, "wb") as f:
        for tokens in packed_batches(source.documents(split), tokenizer):
            f.write(np.asarray(tokens, dtype=dtype).tobytes())
            count += len(tokens)
    if count == 0:
        raise ValueError(f"empty data: source {source.fingerprint()} yields no tokens for split {split!r}")
    return count


def _check_meta(meta: dict, meta_path: Path, source: Source, tokenizer: Any) -> None:
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"token cache {meta_path.parent} was built with tokenizer {meta['tokenizer']!r} "
            f"(fingerprint {meta['tokenizer_fingerprint']}), but this run's tokenizer is "
            f"{tokenizer_name(tokenizer)!r} (fingerprint {tokenizer_fingerprint(tokenizer)}); "
            f"point cache_dir at another folder or delete {meta_path.parent} to re-tokenize"
        )
    if meta["source"] != source.fingerprint():
        raise ValueError(
            f"token cache {meta_path.parent} holds source {meta['source']!r}, not {source.fingerprint()!r}; "
            f"point cache_dir at another folder or delete {meta_path.parent} to re-tokenize"
        )


def load_stream(directory: Path, split: str, source: Source, tokenizer: Any) -> TokenStream | None:
    """The cached stream of `split` in `directory`, None when absent; ValueError when it was
    made by another tokenizer or from another source."""
    meta_path, bin_path = directory / f"{split}.json", directory / f"{split}.bin"
    if not (meta_path.exists() and bin_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    _check_meta(meta, meta_path, source, tokenizer)
    stream = TokenStream(bin_path, meta["dtype"], meta["num_tokens"])
    if bin_path.stat().st_size != stream.num_tokens * np.dtype(stream.dtype).itemsize:
        return None  # the bin was replaced after its meta was written: rebuild
    return stream


def build_stream(directory: Path, split: str, source: Source, tokenizer: Any) -> TokenStream:
    """Tokenize `split` of `source` into `directory` (bin first, meta last, both atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer)
    bin_path = directory / f"{split}.bin"
    began = time.perf_counter()
    count = write_atomically(bin_path, lambda tmp: _write_stream(tmp, source, split, tokenizer, dtype))
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer_name(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "source": source.fingerprint(),
        "split": split,
        "num_tokens": count,
        "dtype": dtype.name,
    }
    write_atomically(directory / f"{split}.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    log.info("tokenized %s/%s: %d tokens in %.1f s", directory, split, count, time.perf_counter() - began)
    return TokenStream(bin_path, dtype.name, count)


def cached_stream(directory: Path, split: str, source: Source, tokenizer: Any) -> TokenStream:
    """The packed stream of `split`: loaded from `directory` when cached, else built there."""
    return load_stream(directory, split, source, tokenizer) or build_stream(directory, split, source, tokenizer)
