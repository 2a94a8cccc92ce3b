import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import head_weight, l2_alignment, linear_kl
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
    """KL sum ×τ², NLL sums and agreement count from full [B, T, V] logits."""
    lt, ls = head_t(h_t), head_s(h_s)
    pt = F.log_softmax(lt / tau, -1)
    kl = (pt.exp() * (pt - F.log_softmax(ls / tau, -1))).sum() * tau**2
    nll_s = F.cross_entropy(ls.flatten(0, 1), labels.flatten(), reduction="sum")
    nll_t = F.cross_entropy(lt.flatten(0, 1), labels.flatten(), reduction="sum")
    agree = (lt.argmax(-1) == ls.argmax(-1)).sum()
    return kl, nll_s, nll_t, agree


def _linear_kl(head_t, head_s, h_t, h_s, labels, **kw):
    return linear_kl(h_s, head_s.weight, h_t, head_t.weight, labels=labels, backend="torch", **kw)


@pytest.mark.parametrize("chunk", [1, 5, 14, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_linear_kl_of_batches_equals_full_logits(chunk, tau):
    """[B, T, C] inputs: means over B·T tokens; the loss's gradient (KL + 0.5 CE) is the full-logits one."""
    head_t, head_s, h_t, h_s, labels = _heads_and_states()
    out = _linear_kl(head_t, head_s, h_t, h_s, labels, temperature=tau, ce_weight=0.5, chunk_tokens=chunk)
    kl, nll_s, nll_t, agree = _direct(head_t, head_s, h_t, h_s, labels, tau)
    n = labels.numel()
    assert out.tokens == n
    torch.testing.assert_close(out.kl, kl.detach() / n, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.student_nll, nll_s.detach() / n, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.teacher_nll, nll_t.detach() / n, rtol=1e-6, atol=0)
    assert out.top1.item() == agree.item() / n
    torch.testing.assert_close(out.loss, (kl + 0.5 * nll_s).detach() / n, rtol=1e-6, atol=0)

    (g_fused,) = torch.autograd.grad(out.loss, h_s)
    (g_direct,) = torch.autograd.grad((kl + 0.5 * nll_s) / n, h_s)
    torch.testing.assert_close(g_fused, g_direct, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_kl_skips_ignored_labels(backend):
    """Ignored tokens count nowhere and get a zero gradient; the rest match the kept tokens alone."""
    head_t, head_s, h_t, h_s, labels = _heads_and_states()
    masked = labels.clone()
    masked[0, 3:] = -100
    masked[1, :2] = -100
    keep = masked != -100
    dtype = torch.float64 if backend == "torch" else torch.float32
    h_s = h_s.detach().to(dtype).requires_grad_()
    out = linear_kl(h_s, head_s.weight.to(dtype), h_t.to(dtype), head_t.weight.to(dtype), labels=masked,
                    kind="reverse", backend=backend)
    (grad,) = torch.autograd.grad(out.loss, h_s)
    kept = linear_kl(h_s[keep], head_s.weight.to(dtype), h_t[keep].to(dtype), head_t.weight.to(dtype),
                     labels=labels[keep], kind="reverse", backend=backend)
    (grad_kept,) = torch.autograd.grad(kept.loss, h_s)
    assert out.tokens == keep.sum().item() == 8
    for field in ("loss", "kl", "student_nll", "teacher_nll", "top1"):
        torch.testing.assert_close(getattr(out, field), getattr(kept, field), rtol=1e-6, atol=0)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    # relative to the whole gradient: single fp32 entries near zero carry cancellation error
    err = ((grad - grad_kept).norm() / grad_kept.norm()).item()
    assert err <= (1e-12 if dtype == torch.float64 else 1e-6), err
    # a batch with no counted token adds nothing: loss 0, no gradient, count 0
    h_s.grad = None
    empty = _linear_kl(head_t, head_s, h_t, h_s, torch.full_like(labels, -100))
    empty.loss.backward()
    assert empty.loss.item() == 0 and int(empty.tokens) == 0 and not h_s.grad.any()


def test_linear_kl_uses_the_shared_prefix_of_a_padded_teacher_head(caplog):
    """A teacher head with rows past the student's vocabulary (padding): its first V rows are used,
    with one warning per process; a teacher head shorter than the student's is an error."""
    import distill.losses as losses

    head_t, head_s, h_t, h_s, labels = _heads_and_states()
    padded = torch.cat([head_t.weight.detach(), torch.full((6, 12), 50.0, dtype=torch.float64)])
    losses._warn_teacher_vocab_prefix.cache_clear()
    with caplog.at_level(logging.WARNING, logger="distill.losses"):
        out = linear_kl(h_s, head_s.weight, h_t, padded, labels=labels, backend="torch")
        linear_kl(h_s, head_s.weight, h_t, padded, labels=labels, backend="torch")
    ref = _linear_kl(head_t, head_s, h_t, h_s, labels)
    torch.testing.assert_close(out.kl, ref.kl, rtol=0, atol=0)
    warnings = [r for r in caplog.records if "first 50" in r.getMessage()]
    assert len(warnings) == 1 and "56 rows" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="teacher head has 44 rows, fewer than the student's 50"):
        linear_kl(h_s, head_s.weight, h_t, head_t.weight[:44], labels=labels)


def test_kl_is_zero_for_identical_models():
    head_t, _, h_t, _, labels = _heads_and_states()
    out = _linear_kl(head_t, head_t, h_t, h_t.clone().requires_grad_(), labels)
    assert abs(out.kl.item()) < 1e-12
    assert out.top1.item() == 1.0
    assert out.student_nll.item() == pytest.approx(out.teacher_nll.item(), rel=1e-12)


def test_head_weight_rejects_a_biased_head():
    assert head_weight(nn.Linear(4, 6, bias=False)).shape == (6, 4)
    with pytest.raises(ValueError, match="without bias"):
        head_weight(nn.Linear(4, 6))


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
    (dict(kind="kl"), "kind='kl' is not one of"),
    (dict(kind="jsd", beta=0.0), "beta=0.0 must lie in"),
    (dict(kl_weight=0.0, ce_weight=0.0), "kl_weight and ce_weight are both 0"),
    (dict(hidden_weight=-0.1), "must all be >= 0"),
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


def _tiny_module():
    """A DistillModule over a random 2-layer Llama teacher and its RWKV-7 student (ffn=rwkv)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.module import DistillModule
    from models.student import StudentConfig, build_student
    from models.teacher import FrozenTeacher

    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, vocab_size=61)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = build_student(teacher, StudentConfig(time_mix="rwkv7", ffn="rwkv"))
    return DistillModule(FrozenTeacher(teacher), student, torch.optim.AdamW), student


@pytest.mark.parametrize("trainable, expected", [
    ("time_mix", lambda s: {id(p) for b in s.layers for p in b.time_mix.parameters()}),
    ("new", lambda s: {id(p) for b in s.layers for m in (b.time_mix, b.mlp) for p in m.parameters()}),
    ("all", lambda s: {id(p) for p in s.parameters()}),
])
def test_stage_trains_exactly_its_parameter_group(trainable, expected):
    """With ffn=rwkv the channel mixes are new: `new` trains them and the time mixes, nothing copied."""
    module, student = _tiny_module()
    module.set_stage(0, Stage(**_stage(trainable=trainable)), total_steps=10)
    assert {id(p) for p in student.parameters() if p.requires_grad} == expected(student)


def test_kl_stage_loss_weighs_its_logged_parts_as_configured():
    """loss = kl_weight kl + hidden_weight hidden + ce_weight ce, with the stage's kind, beta and τ."""
    torch.manual_seed(0)
    module, _ = _tiny_module()
    stage = Stage(**_stage(kind="jsd", beta=0.3, temperature=1.5, kl_weight=0.5, hidden_weight=0.2, ce_weight=0.7))
    module.set_stage(0, stage, total_steps=10)
    input_ids = torch.randint(0, 61, (2, 9))
    labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], 1)
    parts = module.stage_loss(input_ids, labels)
    expected = 0.5 * parts["kl"] + 0.2 * parts["hidden"] + 0.7 * parts["ce"]
    torch.testing.assert_close(parts["loss"].detach(), expected, rtol=1e-6, atol=0)
    assert parts["loss"].requires_grad and not parts["kl"].requires_grad and 0 < parts["top1"] <= 1
