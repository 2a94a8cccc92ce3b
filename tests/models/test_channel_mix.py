"""RWKV-7 channel mix (ffn=rwkv): token-by-token transcription, RWKV-7 init (the block's FFN adds
nothing at init), recurrent state and gradients, and its place in a built student."""

import math

import pytest
import torch

from models.channel_mix import RWKV7ChannelMix
from models.student import StudentConfig, build_student, resolve
from tests.models.test_rad_rwkv7 import randomize, shape
from tests.models.test_rwkv7 import assert_chunking_invariant, rel
from tests.models.test_student import make_teacher


def make_ffn(layer_id: int, **overrides) -> RWKV7ChannelMix:
    sh = shape(**overrides)
    return RWKV7ChannelMix(sh, resolve(StudentConfig(ffn="rwkv"), sh), layer_id).double()


def test_matches_the_formula_token_by_token_from_a_carried_input():
    torch.manual_seed(0)
    cm = make_ffn(1)
    randomize(cm)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    prev = torch.randn(2, 32, dtype=torch.float64)
    out, state = cm(x, {"shift": prev})
    for t in range(6):
        x_prev = prev if t == 0 else x[:, t - 1]
        xk = x[:, t] + (x_prev - x[:, t]) * cm.x_k
        expected = torch.relu(xk @ cm.key.weight.T).square() @ cm.value.weight.T
        assert rel(out[:, t], expected) <= 1e-12
    assert torch.equal(state["shift"], x[:, -1])
    fresh, _ = cm(x)  # no state: zeros before the first token
    assert rel(fresh[:, 1:], out[:, 1:]) <= 1e-12 and rel(fresh[:, 0], out[:, 0]) > 1e-3


def test_init_values():
    L, C, F = 3, 32, 64
    for layer_id in range(L):
        cm = make_ffn(layer_id)
        for n in (0, 5, 20, C - 1):
            expected = 1 - (n / C) ** ((1 - layer_id / L) ** 4)
            assert cm.x_k[n].item() == pytest.approx(expected, abs=1e-6)
        assert cm.key.weight.shape == (F, C) and cm.value.weight.shape == (C, F)
        assert cm.key.bias is None and cm.value.bias is None
        bound = 0.5 / math.sqrt(C)
        assert cm.key.weight.abs().max() <= bound and cm.key.weight.abs().max() > 0.9 * bound
        assert cm.key.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform
        assert torch.all(cm.value.weight == 0)
        assert torch.all(cm(torch.randn(1, 4, C, dtype=torch.float64))[0] == 0)


def test_parallel_step_and_chunks_agree():
    torch.manual_seed(1)
    cm = make_ffn(2)
    randomize(cm)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert_chunking_invariant(lambda t0, t1, state: cm(x[:, t0:t1], state), 7)


def test_gradients_reach_every_parameter_and_the_carried_input():
    torch.manual_seed(2)
    cm = make_ffn(1)
    with torch.no_grad():  # W_v = 0 at init blocks the gradient of W_k and x_k
        cm.value.weight.normal_()
    prev = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    out, _ = cm(torch.randn(2, 5, 32, dtype=torch.float64), {"shift": prev})
    out.square().sum().backward()
    for name, p in cm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert prev.grad.abs().sum() > 0


@pytest.mark.parametrize("time_mix", ["rad_rwkv7", "rwkv7"])
def test_in_a_student_the_new_ffn_adds_nothing_at_init(time_mix):
    teacher = make_teacher("qwen2", num_hidden_layers=3, intermediate_size=40)
    student = build_student(teacher, StudentConfig(time_mix=time_mix, ffn="rwkv"))
    for block in student.layers:
        assert isinstance(block.mlp, RWKV7ChannelMix) and block.mlp.key.out_features == 40
    assert not any(".mlp." in key and "proj" in key for key in student.state_dict())
    # the teacher's norms are still copied; only its MLP weights are left out
    assert torch.equal(student.layers[2].post_attention_layernorm.weight,
                       teacher.model.layers[2].post_attention_layernorm.weight)
    ids = torch.randint(0, 61, (2, 6))
    out = student(ids)
    h, rope, v_first = student.embed_tokens(ids), student.rope(student.embed_tokens(ids)), None
    for block, got in zip(student.layers, out.hidden_states, strict=True):
        mixed, v_first, _ = block.time_mix(block.input_layernorm(h), rope, v_first)
        h = h + mixed
        torch.testing.assert_close(got, h, rtol=0, atol=0)
    assert all(s.keys() == {"shift"} for s in out.state.ffn)
