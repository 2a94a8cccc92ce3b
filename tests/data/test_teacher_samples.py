import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import distill.data.teacher_samples as ts
from distill.data import TeacherSamplesSource
from distill.data.teacher_samples import cut_at_stop, sample_next, teacher_fingerprint
from tests.data.conftest import WORDS


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def bound(tmp_path, tok, teacher=None, **settings) -> TeacherSamplesSource:
    kwargs = {"num_documents": 10, "max_new_tokens": 12, "seed": 3, "batch_size": 4, "heldout_percent": 30.0}
    source = TeacherSamplesSource(**{**kwargs, **settings})
    return source.bind(teacher=teacher or tiny_llama(), tokenizer=tok, cache_dir=tmp_path)


def test_samples_are_cached_and_reloaded_identically(tmp_path, tok, monkeypatch):
    first = bound(tmp_path, tok)
    docs = list(first.documents("all"))
    assert first.samples_path.exists() and first.samples_path.parent == tmp_path / "teacher_samples"
    assert 0 < len(docs) <= 10

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again instead of loading the cache")

    monkeypatch.setattr(ts, "sample_documents_ids", no_sampling)
    again = bound(tmp_path, tok)
    assert again.samples_path == first.samples_path
    assert list(again.documents("all")) == docs


def test_sampling_is_seeded(tmp_path, tok):
    docs = list(bound(tmp_path / "a", tok).documents("all"))
    assert list(bound(tmp_path / "b", tok).documents("all")) == docs
    other = bound(tmp_path / "a", tok, seed=4)
    assert list(other.documents("all")) != docs


def test_documents_stop_before_bos_or_eos_and_respect_the_length(tmp_path, tok):
    source = bound(tmp_path, tok, num_documents=16, max_new_tokens=6)
    docs = list(source.documents("all"))
    ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    assert all(0 < len(i) <= 6 and 1 not in i and 2 not in i for i in ids)
    assert sorted([*source.documents("train"), *source.documents("heldout")]) == sorted(docs)


def test_sampling_key_follows_teacher_and_settings(tmp_path, tok):
    base = bound(tmp_path, tok)
    assert bound(tmp_path, tok, teacher=tiny_llama(seed=1)).samples_path != base.samples_path
    assert bound(tmp_path, tok, temperature=0.5).samples_path != base.samples_path
    assert bound(tmp_path, tok, heldout_percent=0.0).samples_path == base.samples_path  # same samples, other split
    assert bound(tmp_path, tok, heldout_percent=0.0).fingerprint() != base.fingerprint()


def test_teacher_fingerprint_sees_weights():
    model = tiny_llama()
    assert teacher_fingerprint(model) == teacher_fingerprint(model)
    assert teacher_fingerprint(model) != teacher_fingerprint(tiny_llama(seed=1))


def test_top_1_sampling_is_argmax_and_top_k_stays_in_the_top_k():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, 1, generator), logits.argmax(-1))
    top3 = torch.topk(logits, 3).indices
    picks = sample_next(logits, 2.0, 3, generator)
    assert (top3 == picks[:, None]).any(-1).all()


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7, 1], {1, 2}) == [5, 6]
    assert cut_at_stop([5, 6], {1, 2}) == [5, 6]
    assert cut_at_stop([1, 5], {1, 2}) == []


def test_unbound_source_and_too_long_samples_are_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="has no teacher"):
        TeacherSamplesSource(num_documents=2, max_new_tokens=4).fingerprint()
    with pytest.raises(ValueError, match="max_new_tokens=64 does not fit the teacher's context of 64"):
        bound(tmp_path, tok, max_new_tokens=64)
    with pytest.raises(ValueError, match="temperature=0"):
        TeacherSamplesSource(num_documents=2, max_new_tokens=4, temperature=0)
