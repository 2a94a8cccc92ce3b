import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import l2_alignment, logit_stats
from distill.module import warmup_cosine
from distill.stages import Stage, stages_from_config


def _heads_and_states(B=2, T=7, C=12, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    head_t, head_s = nn.Linear(C, V, bias=False).double(), nn.Linear(C, V, bias=False).double()
    h_t = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    h_s = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    return head_t, head_s, h_t, h_s, labels


def _direct(head_t, head_s, h_t, h_s, labels, tau):
    """The same quantities from full [B, T, V] logits."""
    lt, ls = head_t(h_t), head_s(h_s)
    pt = F.log_softmax(lt / tau, -1)
    kl = (pt.exp() * (pt - F.log_softmax(ls / tau, -1))).sum() * tau**2
    nll_s = F.cross_entropy(ls.flatten(0, 1), labels.flatten(), reduction="sum")
    nll_t = F.cross_entropy(lt.flatten(0, 1), labels.flatten(), reduction="sum")
    agree = (lt.argmax(-1) == ls.argmax(-1)).sum()
    return kl, nll_s, nll_t, agree


@pytest.mark.parametrize("chunk", [1, 5, 14, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_logit_stats_equal_full_logits(chunk, tau):
    head_t, head_s, h_t, h_s, labels = _heads_and_states()
    stats = logit_stats(h_t, head_t, h_s, head_s, labels, temperature=tau, chunk_tokens=chunk)
    kl, nll_s, nll_t, agree = _direct(head_t, head_s, h_t, h_s, labels, tau)
    assert stats.tokens == labels.numel()
    torch.testing.assert_close(stats.kl, kl.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.student_nll, nll_s.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.teacher_nll, nll_t.float(), rtol=1e-6, atol=1e-6)
    assert stats.top1_agree.item() == agree.item()

    (g_chunked,) = torch.autograd.grad(stats.kl + stats.student_nll, h_s)
    (g_direct,) = torch.autograd.grad(kl + nll_s, h_s)
    torch.testing.assert_close(g_chunked, g_direct, rtol=1e-5, atol=1e-7)


def test_logit_stats_skips_ignored_labels():
    head_t, head_s, h_t, h_s, labels = _heads_and_states()
    masked = labels.clone()
    masked[:, 3:] = -100
    stats = logit_stats(h_t, head_t, h_s, head_s, masked, chunk_tokens=4)
    kl, *_ = _direct(head_t, head_s, h_t[:, :3], h_s[:, :3], labels[:, :3], 1.0)
    assert stats.tokens == 2 * 3
    torch.testing.assert_close(stats.kl, kl.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no counted tokens"):
        logit_stats(h_t, head_t, h_s, head_s, torch.full_like(labels, -100))


def test_kl_is_zero_for_identical_models():
    head_t, _, h_t, _, labels = _heads_and_states()
    stats = logit_stats(h_t, head_t, h_t.clone().requires_grad_(), head_t, labels, chunk_tokens=3)
    assert abs(stats.kl.item()) < 1e-9
    assert stats.top1_agree.item() == labels.numel()


def test_l2_alignment_is_mean_token_norm_over_sqrt_d():
    target = torch.zeros(2, 3, 4)
    pred = torch.zeros(2, 3, 4)
    pred[..., 0] = 3.0
    pred[..., 1] = 4.0  # every token's error has norm 5
    assert l2_alignment(target, pred).item() == pytest.approx(5 / math.sqrt(4))


def test_warmup_cosine_schedule_shape():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warmup, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warmup, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warmup, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, total, warmup, 0.1) == pytest.approx(0.1)


def _stage(**kw):
    base = dict(name="s", loss="kl", tokens=10_000, seq_len=100, batch_size=4, lr=1e-3)
    return {**base, **kw}


def test_stage_steps_from_token_budget():
    stage = Stage(**_stage())
    assert stage.steps() == 25
    assert stage.steps(world_size=2, accumulate=2) == 7  # ceil(10000 / 1600)
    assert stage.steps(cap=20) == 20


@pytest.mark.parametrize("bad, match", [
    (dict(loss="mse"), "loss='mse'"),
    (dict(trainable="mlp"), "trainable='mlp'"),
    (dict(tokens=0), "tokens=0"),
    (dict(temperature=0), "temperature=0"),
])
def test_stage_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        Stage(**_stage(**bad))


def test_stages_from_config_errors():
    with pytest.raises(ValueError, match="empty"):
        stages_from_config([])
    with pytest.raises(ValueError, match="unknown keys.*'lrr'"):
        stages_from_config([_stage(lrr=1)])
    with pytest.raises(ValueError, match="unique"):
        stages_from_config([_stage(), _stage()])


@pytest.mark.parametrize("trainable, expected", [
    ("time_mix", lambda s: {id(p) for b in s.layers for p in b.time_mix.parameters()}),
    ("new", lambda s: {id(p) for b in s.layers for m in (b.time_mix, b.mlp) for p in m.parameters()}),
    ("all", lambda s: {id(p) for p in s.parameters()}),
])
def test_stage_trains_exactly_its_parameter_group(trainable, expected):
    """With ffn=rwkv the channel mixes are new: `new` trains them and the time mixes, nothing copied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.module import DistillModule
    from models.student import StudentConfig, build_student
    from models.teacher import FrozenTeacher

    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, vocab_size=61)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = build_student(teacher, StudentConfig(time_mix="rwkv7", ffn="rwkv"))
    module = DistillModule(FrozenTeacher(teacher), student, torch.optim.AdamW)
    module.set_stage(0, Stage(**_stage(trainable=trainable)), total_steps=10)
    assert {id(p) for p in student.parameters() if p.requires_grad} == expected(student)
