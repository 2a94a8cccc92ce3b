from pathlib import Path

import pytest

from tests.distill.helpers import ASSETS, SHAKESPEARE, make_tiny_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS)")
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), SHAKESPEARE.read_text()[:200_000])
