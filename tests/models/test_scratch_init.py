"""student.init=scratch: the same student architecture with random weights where the teacher's
would be copied (the from-scratch baseline of benchmarks/quality.py)."""

import pytest
import torch

from models.student import StudentConfig, build_student, teacher_state
from tests.models.test_student import make_teacher


def test_scratch_student_has_the_architecture_and_new_parts_but_not_the_teachers_weights():
    teacher = make_teacher("qwen2", dtype=torch.float32)  # q/k/v biases
    torch.manual_seed(0)
    distilled = build_student(teacher, StudentConfig())
    torch.manual_seed(0)
    scratch = build_student(teacher, StudentConfig(init="scratch"))
    a, b = distilled.state_dict(), scratch.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    copied = [k for k in teacher_state(teacher, scratch.config) if k in b]  # what init=teacher copies
    assert "embed_tokens.weight" in copied and "layers.0.time_mix.q_proj.weight" in copied
    for name in copied:
        if name.endswith("norm.weight"):
            assert torch.equal(b[name], torch.ones_like(b[name])), name  # RMSNorm's init
        else:
            assert not torch.equal(a[name], b[name]), name
    # HF Llama-family init: normal(0, initializer_range = 0.02), zero biases
    assert b["embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(b["layers.0.time_mix.q_proj.bias"], torch.zeros_like(b["layers.0.time_mix.q_proj.bias"]))
    for name in set(b) - set(copied):  # the new parts' deterministic inits (decay, k_k, ...) are the same
        if "lora" not in name or name.endswith("bias"):
            assert torch.equal(a[name], b[name]), name
    assert not any(p.requires_grad is False for p in scratch.parameters())


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match=r"init='random' is unknown; valid: \['teacher', 'scratch'\]"):
        build_student(make_teacher("llama"), StudentConfig(init="random"))
