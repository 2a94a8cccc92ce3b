from pathlib import Path

import pytest

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
