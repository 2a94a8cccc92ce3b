from pathlib import Path

import pytest

from distill.data.stdlib import stdlib_documents
from tests.distill.helpers import ASSETS, SHAKESPEARE, make_tiny_teacher


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """The tinyshakespeare text of the shared assets; skips where the checkout has none beside it."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS to the shared assets folder)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, shakespeare) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), shakespeare.read_text()[:200_000])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """1 MB of Python standard-library source: training text that every machine has, for the tests
    that must run where the shared assets are absent (fault tolerance, W&B, SLURM in CI)."""
    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    path.write_text("\n".join(stdlib_documents("train"))[:1_000_000])
    return path


@pytest.fixture(scope="session")
def stdlib_teacher(corpus, tmp_path_factory) -> Path:
    """tiny_teacher's model, with its tokenizer trained on `corpus`."""
    return make_tiny_teacher(tmp_path_factory.mktemp("stdlib_teacher"), corpus.read_text()[:200_000])
