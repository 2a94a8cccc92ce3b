"""Text sources: where the documents of a run come from, split into train and held-out.

Every source has `fingerprint() -> str`, a stable description of everything that changes the
documents it yields (the token cache is keyed by it), and `documents(split)` for split in
{"train", "heldout", "all"}, where "all" is "train" and "heldout" together. Sources that need
the run's teacher (teacher samples) get it through `bind` from the DataModule.
"""

from __future__ import annotations

import glob
import json
import os
import platform
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from distill.data.stdlib import SPLITS, is_heldout, stdlib_documents

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_READ_CHARS = 1 << 20  # separator-split .txt files are read in 1M-character pieces


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")


def check_percent(name: str, value: float) -> None:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 100]")


def in_split(document: str, split: str, heldout_percent: float) -> bool:
    """Held-out membership by a hash of the document text: the same on every machine, and
    duplicates of one document always land in the same split."""
    return split == "all" or is_heldout(document, heldout_percent) == (split == "heldout")


class Source(ABC):
    """A corpus of documents with a deterministic train/held-out split."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Everything that changes the documents: equal fingerprints mean equal documents."""

    @abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """The documents of `split` ("train", "heldout" or "all"), in a fixed order."""

    def bind(self, *, teacher: Any, tokenizer: Any, cache_dir: str | Path) -> Source:
        """Hand the run's teacher, tokenizer and cache dir to a source that needs them."""
        return self


class StdlibSource(Source):
    """The quickstart corpus: one document per stdlib source file (distill.data.stdlib)."""

    def __init__(self, heldout_percent: float = 3.0) -> None:
        check_percent("heldout_percent", heldout_percent)
        self.heldout_percent = heldout_percent

    def fingerprint(self) -> str:
        return f"stdlib(python={platform.python_version()}, heldout_percent={self.heldout_percent})"

    def documents(self, split: str) -> Iterator[str]:
        return stdlib_documents(split, self.heldout_percent)


def resolve_paths(patterns: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files named by paths or globs, each pattern's matches sorted, in pattern order."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in map(str, patterns):
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for match in map(Path, matches):
            if match.is_dir():
                raise ValueError(f"{str(match)!r} is a directory; name its files, e.g. {str(match / '*.txt')!r}")
            files.append(match.resolve())
    if not files:
        raise ValueError("paths is empty; give at least one file or glob")
    return files


def files_signature(files: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file: changes whenever a file is edited, like make's rule."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def split_stream(pieces: Iterable[str], separator: str) -> Iterator[str]:
    """Documents between separators of a text read piece by piece, stripped, empties dropped."""
    rest = ""
    for piece in pieces:
        *complete, rest = (rest + piece).split(separator)
        yield from (doc.strip() for doc in complete if doc.strip())
    if rest.strip():
        yield rest.strip()


def _read_pieces(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        while piece := f.read(_READ_CHARS):
            yield piece


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{path}:{line_no} has no field {text_field!r} (fields: {sorted(record)})")
            yield record[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # imported on use, like datasets below: only these files need it

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from batch.column(0).to_pylist()


class LocalFilesSource(Source):
    """Documents from local .txt, .jsonl or .parquet files (paths or globs).

    .txt: one document per file, or, with `document_separator` (e.g. "<|endoftext|>"), the
    whitespace-stripped pieces between separators. .jsonl / .parquet: one document per record,
    its `text_field`. Held-out membership by document hash (`heldout_percent`).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str,
        text_field: str = "text",
        document_separator: str | None = None,
        heldout_percent: float = 1.0,
    ) -> None:
        check_percent("heldout_percent", heldout_percent)
        if document_separator == "":
            raise ValueError("document_separator='' splits nothing; give a string like '<|endoftext|>' or None")
        self.files = resolve_paths(paths)
        for f in self.files:
            if f.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"{str(f)!r} has suffix {f.suffix!r}; supported: {TEXT_SUFFIXES}")
        self.text_field = text_field
        self.document_separator = document_separator
        self.heldout_percent = heldout_percent

    def fingerprint(self) -> str:
        return (
            f"local_files(files={files_signature(self.files)}, text_field={self.text_field!r}, "
            f"separator={self.document_separator!r}, heldout_percent={self.heldout_percent})"
        )

    def _file_documents(self, path: Path) -> Iterator[str]:
        if path.suffix == ".jsonl":
            return _jsonl_texts(path, self.text_field)
        if path.suffix == ".parquet":
            return _parquet_texts(path, self.text_field)
        if self.document_separator is None:
            return iter([path.read_text(encoding="utf-8", errors="replace")])
        return split_stream(_read_pieces(path), self.document_separator)

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        for path in self.files:
            for doc in self._file_documents(path):
                if in_split(doc, split, self.heldout_percent):
                    yield doc


class HFDatasetSource(Source):
    """A `datasets.load_dataset` corpus (hub or local builders such as "json" / "parquet").

    The first `heldout_documents` documents are held out, the ones after them are train (at most
    `max_documents` of them): a streaming dataset needs no full pass to find its held-out part.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        text_field: str = "text",
        streaming: bool = True,
        heldout_documents: int = 1000,
        max_documents: int | None = None,
        data_files: str | Sequence[str] | None = None,
        revision: str | None = None,
    ) -> None:
        if heldout_documents < 0:
            raise ValueError(f"heldout_documents={heldout_documents} must be >= 0")
        if max_documents is not None and max_documents < 0:
            raise ValueError(f"max_documents={max_documents} must be >= 0 or None (no limit)")
        self.path, self.name, self.split, self.revision = path, name, split, revision
        self.text_field, self.streaming = text_field, streaming
        self.heldout_documents, self.max_documents = heldout_documents, max_documents
        if isinstance(data_files, str):
            data_files = [data_files]
        self.data_files = None if data_files is None else [str(f) for f in data_files]

    def fingerprint(self) -> str:
        # Local data files change without a new revision: their sizes and times join the key.
        local = [f for f in self.data_files or [] if glob.glob(os.path.expanduser(f))]
        return (
            f"hf_dataset(path={self.path!r}, name={self.name!r}, split={self.split!r}, "
            f"revision={self.revision!r}, data_files={self.data_files!r}, "
            f"local={files_signature(resolve_paths(local)) if local else []}, text_field={self.text_field!r}, "
            f"heldout_documents={self.heldout_documents}, max_documents={self.max_documents})"
        )

    def _texts(self) -> Iterator[str]:
        import datasets  # slow to import; only this source needs it

        ds = datasets.load_dataset(
            self.path,
            self.name,
            split=self.split,
            streaming=self.streaming,
            data_files=self.data_files,
            revision=self.revision,
        )
        if ds.column_names is not None and self.text_field not in ds.column_names:
            raise ValueError(f"dataset {self.path!r} has no column {self.text_field!r} (columns: {ds.column_names})")
        return (record[self.text_field] for record in ds)

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        texts = self._texts()
        heldout_end = self.heldout_documents
        end = None if self.max_documents is None else heldout_end + self.max_documents
        start = heldout_end if split == "train" else 0
        stop = heldout_end if split == "heldout" else end
        return islice(texts, start, stop)
