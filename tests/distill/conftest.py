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


@pytest.fixture(scope="session")
def exported_student(tiny_teacher, tmp_path_factory):
    """A rad_rwkv7 student (RoPE, so its ONNX step takes the position) exported as format=onnx and
    format=hf from one checkpoint: (the fp32 student, the onnx folder, the hf folder)."""
    from distill.export import export
    from models.student import StudentConfig
    from tests.distill.helpers import export_cfg, write_checkpoint

    root = tmp_path_factory.mktemp("exported_student")
    ckpt, student = write_checkpoint(tiny_teacher, StudentConfig(w_lora=8, a_lora=8, v_lora=8, g_lora=8),
                                     root / "a.ckpt")
    for name in ("onnx", "hf"):
        export(export_cfg(root / name, f"ckpt={ckpt}", f"out={root / name / 'folder'}", f"format={name}"))
    return student, root / "onnx" / "folder", root / "hf" / "folder"
