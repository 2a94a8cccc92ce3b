"""RAD-RWKV6 time mix against an independent head-by-head transcription of DESIGN §4 over the
WKV6 reference, its init (identity token shift, RWKV-6 decay ramp, u = 0, W_g = 0), the teacher's
q/k/v without RoPE, recurrent state and gradients."""

import pytest
import torch

from kernels.reference import wkv6_reference
from models.rad_rwkv6 import RadRWKV6, shift_rank
from models.student import StudentConfig, build_student, resolve
from tests.models.test_rad_rwkv7 import randomize, shape
from tests.models.test_rwkv7 import (align_losses, assert_chunking_invariant, linear, norm_head, rel, rms_heads,
                                     shifted)
from tests.models.test_student import FAMILIES, assert_heads_are_teacher_heads, make_teacher, teacher_qkv


def make_layer(layer_id: int, sh=None, **cfg) -> RadRWKV6:
    sh = sh or shape()
    return RadRWKV6(sh, resolve(StudentConfig(time_mix="rad_rwkv6", **cfg), sh), layer_id).double()


def reference_rad_rwkv6(tm, x, prev=None, S0=None):
    """DESIGN §4 RAD-RWKV6, head by head, over the step-by-step WKV6 reference; prev [B, C] and S0
    [B, H, N, N] are the carried token-shift input and WKV state. -> (o, S_T)."""
    B, T, C = x.shape
    D, N = tm.head_dim, tm.head_size
    H_t, H = tm.q_proj.out_features // D, tm.q_proj.out_features // N
    rep = H_t // (tm.k_proj.out_features // D)
    dx = shifted(x, prev) - x
    xx = x + dx * tm.mu_x
    xs = {}
    for target, lora in tm.shift_lora.items():  # x_* = x + dx (mu_* + tanh(xx M1_*) M2_*)
        xs[target] = x + dx * (lora.bias + torch.tanh(xx @ lora.down) @ lora.up)
    r = rms_heads(linear(xs["r"], tm.q_proj), tm.q_norm, D)
    k_kv = rms_heads(linear(xs["k"], tm.k_proj), tm.k_norm, D).view(B, T, -1, D)
    v_kv = linear(xs["v"], tm.v_proj).view(B, T, -1, D)
    k = torch.cat([k_kv[:, :, h // rep] for h in range(H_t)], dim=-1)  # GQA: head h reads h // rep
    v = torch.cat([v_kv[:, :, h // rep] for h in range(H_t)], dim=-1)
    lw = tm.w_lora
    log_w = torch.maximum(-torch.exp(lw.bias + torch.tanh(xs["w"] @ lw.down) @ lw.up),
                          torch.tensor(-5.0, dtype=x.dtype))
    k = k * (1 - torch.exp(log_w))
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    y, S = wkv6_reference(heads(r), heads(k), heads(v), heads(log_w), tm.u,
                          initial_state=S0, output_final_state=True)
    y = torch.cat([norm_head(y[:, :, h], tm.ln_x, h, N) for h in range(H)], dim=-1)
    return linear(y * torch.sigmoid(xs["g"] @ tm.gate.weight.T), tm.o_proj), S


@pytest.mark.parametrize("head_size,groupnorm", [(8, True), (16, True), (32, False)])
def test_matches_design_formulas_from_a_carried_state(head_size, groupnorm):
    torch.manual_seed(0)
    B, T, C = 2, 7, 32
    tm = make_layer(1, head_size=head_size, groupnorm=groupnorm)
    randomize(tm)
    x = torch.randn(B, T, C, dtype=torch.float64)
    prev = torch.randn(B, C, dtype=torch.float64)
    S0 = torch.randn(B, C // head_size, head_size, head_size, dtype=torch.float64)
    v_first = torch.randn(B, T, C, dtype=torch.float64)
    out, v_first_after, state = tm(x, None, v_first, {"shift": prev, "wkv": S0})
    ref, ref_S = reference_rad_rwkv6(tm, x, prev, S0)
    assert rel(out, ref) <= 1e-10 and rel(state["wkv"], ref_S) <= 1e-10
    assert torch.equal(state["shift"], x[:, -1])
    assert v_first_after is v_first  # RWKV-6 has no value residual: v_first only passes through
    fresh, _, fresh_state = tm(x, None, None)
    ref_fresh, ref_fresh_S = reference_rad_rwkv6(tm, x)
    assert rel(fresh, ref_fresh) <= 1e-10 and rel(fresh_state["wkv"], ref_fresh_S) <= 1e-10
    assert rel(fresh, out) > 1e-3  # the carried state shows


def test_init_values():
    L, C = 3, 32
    x = torch.randn(2, 5, C, dtype=torch.float64)
    for layer_id in range(L):
        tm = make_layer(layer_id)
        assert torch.all(tm.mu_x == 0)
        for lora in tm.shift_lora.values():
            assert torch.all(lora.bias == 0) and torch.all(lora.down == 0)
            assert lora.up.shape == (32, C)
            torch.testing.assert_close(lora.up @ lora.up.T, 0.01 * torch.eye(32, dtype=torch.float64))
        xs = tm.shifted_inputs(x, {"shift": torch.randn(2, C, dtype=torch.float64)})
        assert list(xs) == ["r", "k", "v", "w", "g"] and all(torch.equal(t, x) for t in xs.values())
        exponent = 0.7 + 1.3 * layer_id / (L - 1)
        for n in (0, 7, 20, C - 1):  # N_k = the attention width here
            expected = -6 + 5 * (n / (C - 1)) ** exponent
            assert tm.w_lora.bias[n].item() == pytest.approx(expected, abs=1e-6)
        assert torch.all(tm.w_lora.down == 0)
        assert tm.u.shape == (4, 8) and torch.all(tm.u == 0)
        assert torch.all(tm.gate.weight == 0) and tm.gate.bias is None
        assert tm.ln_x.eps == 64e-5 and tm.ln_x.num_groups == 4
    single = make_layer(0, shape(num_layers=1))
    assert single.w_lora.bias[5].item() == pytest.approx(-6 + 5 * (5 / 31) ** 0.7, abs=1e-6)
    assert (shift_rank(896), shift_rank(4095), shift_rank(4096)) == (32, 32, 64)


def test_decay_floor_and_finite_output_for_large_inputs():
    torch.manual_seed(1)
    tm = make_layer(1)
    randomize(tm)
    x = 30 * torch.randn(1, 6, 32, dtype=torch.float64)
    log_w = (-torch.exp(tm.w_lora(tm.shifted_inputs(x, None)["w"]))).clamp(min=-5)
    assert log_w.min() == -5 and log_w.max() < 0  # the floor is reached and holds
    out, _, state = tm(x, None, None)
    assert torch.isfinite(out).all() and torch.isfinite(state["wkv"]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_r_k_v_are_the_teacher_q_k_v_without_rope(family):
    teacher = make_teacher(family)  # 4 query heads over 2 KV heads
    student = build_student(teacher, StudentConfig(time_mix="rad_rwkv6"))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.layers, strict=True)):
        tm = s_layer.time_mix
        rkv = [t.view(2, 5, 4, 8) for t in tm.rkv(tm.shifted_inputs(x, None))]
        assert_heads_are_teacher_heads(rkv, teacher_qkv(teacher, i, x, rope=False))
        assert torch.equal(tm.o_proj.weight, t_layer.self_attn.o_proj.weight)


def test_parallel_step_and_chunks_agree():
    torch.manual_seed(3)
    tm = make_layer(1, head_size=16)
    randomize(tm)
    x = torch.randn(2, 8, 32, dtype=torch.float64)

    def run(t0, t1, state):
        out, _, state = tm(x[:, t0:t1], None, None, state)
        return out, state

    assert_chunking_invariant(run, 8)


def test_gradients_reach_every_parameter_and_the_carried_state():
    torch.manual_seed(2)
    tm = make_layer(1, head_size=16)
    randomize(tm)  # at init M2, D2 see a zero LoRA input and W_g = 0 closes the gate's path
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    state = {"shift": torch.randn(2, 32, dtype=torch.float64, requires_grad=True),
             "wkv": torch.randn(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)}
    out, _, new = tm(x, None, None, state)
    (out.square().sum() + new["wkv"].square().sum()).backward()
    for name, p in tm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert state["shift"].grad.abs().sum() > 0 and state["wkv"].grad.abs().sum() > 0


def test_align_training_fits_the_teacher_attention():
    first, last = align_losses("rad_rwkv6")  # measured: 0.81 -> 0.11
    assert last < 0.3 * first, (first, last)
