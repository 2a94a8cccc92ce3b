"""Hybrid students: kept teacher attention layers (copy, GQA, RoPE, sliding windows, KV cache),
where v_first comes from, config validation, parameter groups, alignment_errors."""

import math

import pytest
import torch

from models.attention import TeacherAttention, causal_mask
from models.diagnostics import alignment_errors
from models.student import StudentConfig, build_student
from models.teacher import FrozenTeacher
from tests.models.test_recurrent import assert_states_close, rel
from tests.models.test_student import FAMILIES, make_teacher

WINDOWED = {"mistral": dict(sliding_window=3),  # every layer
            "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)}  # layer 1 only


@pytest.mark.parametrize("family,extra", [(f, {}) for f in FAMILIES] + list(WINDOWED.items()))
def test_keeping_every_layer_reproduces_the_teacher(family, extra):
    teacher = make_teacher(family, **extra)
    student = build_student(teacher, StudentConfig(attention_layers=[0, 1]))
    ids = torch.randint(0, 61, (2, 9))  # longer than the windows of 3
    with torch.no_grad():
        expected = teacher(ids).logits
        assert rel(student.logits(ids), expected) <= 1e-12
        state, steps = None, []
        for t in range(9):  # from the KV cache, token by token
            out = student(ids[:, t:t + 1], state)
            steps.append(student.lm_head(out.last_hidden))
            state = out.state
    assert rel(torch.cat(steps, dim=1), expected) <= 1e-12
    assert state.time_mix[1]["k"].shape == (2, 2, 9, 8)  # [B, H_kv, S, D]: the cache grows


def test_sliding_windows_are_read_per_layer():
    def windows(family, **extra):
        return build_student(make_teacher(family, **extra), StudentConfig()).shape.sliding_windows

    assert windows("qwen2", **WINDOWED["qwen2"]) == (None, 3)
    assert windows("mistral", **WINDOWED["mistral"]) == (3, 3)
    assert windows("llama") is None and windows("qwen3") is None


def test_causal_mask_with_cache_and_window():
    # 2 new queries at absolute positions 3 and 4 over 5 keys, window 3
    expected = torch.tensor([[0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5, 3, torch.device("cpu")), expected)
    plain = causal_mask(3, 3, None, torch.device("cpu"))
    assert torch.equal(plain, torch.ones(3, 3, dtype=torch.bool).tril())


def every_time_mix_parameter(student):
    """Kept attention layers included (time_mix_parameters() leaves them out)."""
    return [p for block in student.layers for p in block.time_mix.parameters()]


def test_kept_layer_is_a_trainable_copy_of_the_teacher_attention():
    teacher = make_teacher("qwen3")  # q_norm / k_norm
    student = build_student(teacher, StudentConfig(attention_layers=[1]))
    kept, converted = student.layers[1].time_mix, student.layers[0].time_mix
    assert isinstance(kept, TeacherAttention) and not isinstance(converted, TeacherAttention)
    for name, p in kept.named_parameters():
        assert torch.equal(p, teacher.model.layers[1].self_attn.get_parameter(name)), name
    time_mix = {id(p) for p in student.time_mix_parameters()}
    assert time_mix == {id(p) for p in converted.parameters()}  # the align stage leaves the copy exact
    assert {id(p) for p in student.new_parameters()} == time_mix  # the MLPs are the teacher's
    frozen = FrozenTeacher(teacher)
    errors = alignment_errors(frozen, student, torch.randint(0, 61, (2, 7)))
    assert errors[1] <= 1e-12 < 1e-3 < errors[0]


def test_alignment_errors_match_a_direct_computation():
    torch.manual_seed(4)
    teacher = make_teacher("llama", num_hidden_layers=3)
    student = build_student(teacher, StudentConfig(attention_layers=[0]))
    with torch.no_grad():
        for p in every_time_mix_parameter(student):
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 61, (2, 6))
    errors = alignment_errors(FrozenTeacher(teacher), student, ids)
    target = FrozenTeacher(teacher)(ids)
    rope = student.rope(target.attn_inputs[0])
    v_first, expected = None, []
    with torch.no_grad():
        for block, x, y in zip(student.layers, target.attn_inputs, target.attn_outputs, strict=True):
            out, v_first, _ = block.time_mix(x, rope, v_first)
            per_token = [((y[b, t] - out[b, t]) ** 2).sum().sqrt().item() / math.sqrt(32)
                         for b in range(2) for t in range(6)]
            expected.append(sum(per_token) / len(per_token))
    assert errors == pytest.approx(expected, rel=1e-12, abs=0)
    assert errors[0] > 1e-6 and min(errors[1:]) > 1e-3  # every layer moved off the teacher


def test_v_first_comes_from_the_first_rwkv_layer():
    torch.manual_seed(5)
    teacher = make_teacher("llama", num_hidden_layers=3)
    cfg = StudentConfig(attention_layers=[0])
    assert cfg.v_first_layer == 1 and StudentConfig().v_first_layer == 0
    assert StudentConfig(attention_layers=[0, 1, 2]).v_first_layer == 3
    student = build_student(teacher, cfg)
    assert student.layers[1].time_mix.v_lora is None and student.layers[2].time_mix.v_lora is not None
    with torch.no_grad():
        for p in every_time_mix_parameter(student):
            p.add_(0.1 * torch.randn_like(p))
        xs = [torch.randn(2, 6, 32, dtype=torch.float64) for _ in range(3)]
        outs = student.time_mix_outputs(xs)
        # layer 2 mixes in layer 1's v: it follows layer 1's input, not the attention layer's
        assert torch.equal(student.time_mix_outputs([xs[0] + 1, xs[1], xs[2]])[2], outs[2])
        assert rel(student.time_mix_outputs([xs[0], xs[1] + 1, xs[2]])[2], outs[2]) > 1e-4
        ids = torch.randint(0, 61, (2, 8))
        full = student(ids)
        first = student(ids[:, :3])
        second = student(ids[:, 3:], first.state)
    assert rel(torch.cat((first.last_hidden, second.last_hidden), 1), full.last_hidden) <= 1e-10
    assert_states_close(second.state, full.state)


@pytest.mark.parametrize("bad", [[2], [-1], [0, 5], ["1"]])
def test_invalid_attention_layers_raise(bad):
    with pytest.raises(ValueError, match=r"attention_layers=.* valid: 0\.\.1"):
        build_student(make_teacher("llama"), StudentConfig(attention_layers=bad))


def test_attention_layers_are_sorted_once_and_unknown_ffn_raises():
    student = build_student(make_teacher("llama"), StudentConfig(attention_layers=[1, 0, 1]))
    assert student.config.attention_layers == [0, 1]
    with pytest.raises(ValueError, match=r"ffn='moe' is unknown; valid: \[.*'teacher'"):
        build_student(make_teacher("llama"), StudentConfig(ffn="moe"))


def test_alignment_errors_of_a_bf16_teacher_and_its_float32_student():
    teacher = make_teacher("qwen2", dtype=torch.bfloat16)
    student = build_student(teacher, StudentConfig(attention_layers=[1]))  # float32
    ids = torch.randint(0, 61, (2, 7))
    errors = alignment_errors(FrozenTeacher(teacher), student, ids)
    scale = FrozenTeacher(teacher)(ids).attn_outputs[1].float().norm(dim=-1).mean().item() / math.sqrt(32)
    # the kept layer differs from the teacher by bf16 rounding only (measured 0.003 of a 0.85 scale)
    assert errors[1] < 0.01 * scale and errors[0] > 0.5 * scale
