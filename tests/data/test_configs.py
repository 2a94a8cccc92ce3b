from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill.data import DistillDataModule, HFDatasetSource, LocalFilesSource, StdlibSource, TeacherSamplesSource
from tests.data.test_teacher_samples import tiny_llama

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
SOURCES = {"stdlib": StdlibSource, "text": LocalFilesSource, "hf": HFDatasetSource, "teacher_samples": TeacherSamplesSource}


def compose(name: str, cache_dir: Path, **overrides):
    cfg = OmegaConf.create({"paths": {"cache_dir": str(cache_dir)}, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg.data


def test_every_data_config_has_a_test():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(SOURCES)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_config_instantiates_the_datamodule_as_the_job_does(name, tmp_path, tok):
    overrides = {
        "text": {"data.source.paths": [str(tmp_path / "corpus.txt")]},
        "teacher_samples": {"data.source.max_new_tokens": 32},  # the tiny teacher's context is 64
    }.get(name, {})
    (tmp_path / "corpus.txt").write_text("a b c")
    teacher = tiny_llama()
    dm = instantiate(compose(name, tmp_path, **overrides), tokenizer=tok, teacher=teacher, seq_len=8, batch_size=2, seed=5)
    assert isinstance(dm, DistillDataModule) and isinstance(dm.source, SOURCES[name])
    assert (dm.seq_len, dm.batch_size, dm.seed, dm.cache_dir) == (8, 2, 5, tmp_path)
    assert dm.tokenizer is tok
    if name == "teacher_samples":
        assert dm.source.teacher is teacher  # bound, not a copy


def test_text_config_needs_paths(tmp_path, tok):
    with pytest.raises(Exception, match="paths"):
        instantiate(compose("text", tmp_path), tokenizer=tok, teacher=None, seq_len=8, batch_size=2, seed=0)


def test_teacher_samples_with_a_local_heldout_file(tmp_path, tok):
    heldout = tmp_path / "held.txt"
    heldout.write_text("a b c d<|endoftext|>e f g a b")
    cfg = compose(
        "teacher_samples",
        tmp_path / "cache",
        **{
            "data.source.num_documents": 8,
            "data.source.max_new_tokens": 10,
            "data.heldout_source": {
                "_target_": "distill.data.LocalFilesSource",
                "paths": [str(heldout)],
                "document_separator": "<|endoftext|>",
                "heldout_percent": 100,
            },
        },
    )
    dm = instantiate(cfg, tokenizer=tok, teacher=tiny_llama(), seq_len=4, batch_size=2, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.summary()["train_tokens"] > 8
    (batch,) = dm.heldout_batches()
    assert batch["input_ids"].tolist() == [[1, 3, 4, 5], [6, 1, 7, 8]]
