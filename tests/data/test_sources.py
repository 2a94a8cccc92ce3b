import json
import os

import pytest

from distill.data.sources import HFDatasetSource, LocalFilesSource, StdlibSource, split_stream
from distill.data.stdlib import stdlib_documents, stdlib_files

SEP = "<|endoftext|>"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_and_empty_glob_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        LocalFilesSource([str(tmp_path / "nope.txt")])
    write(tmp_path / "a.txt", "x")
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
        LocalFilesSource([str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl")])


def test_directories_and_unknown_suffixes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        LocalFilesSource([str(tmp_path)])
    write(tmp_path / "a.csv", "x")
    with pytest.raises(ValueError, match="'.csv'"):
        LocalFilesSource([str(tmp_path / "a.csv")])


def test_txt_is_one_document_per_file_in_sorted_glob_order(tmp_path):
    write(tmp_path / "b.txt", "second\n")
    write(tmp_path / "a.txt", "  first\n")
    assert list(LocalFilesSource(str(tmp_path / "*.txt"), heldout_percent=0).documents("all")) == ["  first\n", "second\n"]


def test_txt_splits_at_the_separator_stripped_without_empties(tmp_path):
    path = write(tmp_path / "s.txt", f"one a{SEP}\n two b \n{SEP}\n\n{SEP}three")
    docs = LocalFilesSource([path], document_separator=SEP, heldout_percent=0).documents("train")
    assert list(docs) == ["one a", "two b", "three"]


@pytest.mark.parametrize("piece", [1, 3, 7, 100])
def test_separator_split_does_not_depend_on_read_pieces(piece):
    text = f"alpha{SEP}beta{SEP}{SEP} gamma {SEP}"
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    assert list(split_stream(pieces, SEP)) == ["alpha", "beta", "gamma"]


def test_jsonl_and_parquet_yield_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "a.jsonl", json.dumps({"body": "x y", "id": 1}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    pq.write_table(pa.table({"body": ["p", "q r"]}), tmp_path / "b.parquet")
    source = LocalFilesSource([tmp_path / "a.jsonl", tmp_path / "b.parquet"], text_field="body", heldout_percent=0)
    assert list(source.documents("all")) == ["x y", "z", "p", "q r"]


def test_missing_text_field_is_named(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="a.jsonl:1 has no field 'text'"):
        list(LocalFilesSource([tmp_path / "a.jsonl"]).documents("all"))


def test_heldout_split_is_disjoint_deterministic_and_about_the_asked_share(tmp_path):
    write(tmp_path / "c.jsonl", "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(400)))
    source = LocalFilesSource([tmp_path / "c.jsonl"], heldout_percent=10.0)
    train, held = list(source.documents("train")), list(source.documents("heldout"))
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(source.documents("all"))
    assert 20 <= len(held) <= 60
    assert held == list(LocalFilesSource([tmp_path / "c.jsonl"], heldout_percent=10.0).documents("heldout"))


def test_fingerprint_follows_file_content_and_settings(tmp_path):
    path = write(tmp_path / "a.txt", "abc")
    before = LocalFilesSource([path]).fingerprint()
    assert LocalFilesSource([path]).fingerprint() == before
    assert LocalFilesSource([path], heldout_percent=2.0).fingerprint() != before
    assert LocalFilesSource([path], document_separator=SEP).fingerprint() != before
    write(path, "abcd")
    assert LocalFilesSource([path]).fingerprint() != before


def test_stdlib_source_is_the_stdlib_corpus_and_its_split():
    source = StdlibSource()
    heldout = list(source.documents("heldout"))
    assert heldout == list(stdlib_documents("heldout", 3.0))
    assert len(heldout) == len(stdlib_files("heldout", 3.0)) > 0
    assert StdlibSource(5.0).fingerprint() != source.fingerprint()


@pytest.fixture
def records(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    path = tmp_path / "r.jsonl"
    write(path, "".join(json.dumps({"text": f"doc {i}", "n": i}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_source_holds_out_the_first_documents(records, streaming):
    source = HFDatasetSource("json", data_files=str(records), streaming=streaming, heldout_documents=2, max_documents=3)
    assert list(source.documents("heldout")) == ["doc 0", "doc 1"]
    assert list(source.documents("train")) == ["doc 2", "doc 3", "doc 4"]
    assert list(source.documents("all")) == [f"doc {i}" for i in range(5)]
    uncapped = HFDatasetSource("json", data_files=str(records), streaming=streaming, heldout_documents=2)
    assert len(list(uncapped.documents("train"))) == 6


def test_hf_dataset_source_fingerprint_and_column_check(records):
    source = HFDatasetSource("json", data_files=[str(records)], heldout_documents=2)
    assert str(records) in source.fingerprint()
    fingerprint = source.fingerprint()
    os.utime(records, ns=(1, 1))
    assert source.fingerprint() != fingerprint  # a local file changed
    with pytest.raises(ValueError, match="no column 'body'"):
        list(HFDatasetSource("json", data_files=str(records), text_field="body").documents("train"))
