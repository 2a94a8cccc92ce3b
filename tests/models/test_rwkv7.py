"""Vanilla RWKV-7 time mix against an independent head-by-head transcription of DESIGN §4, its
init (reference lerps, GQA-widened teacher k/v), the recurrent state and gradients."""

import math

import pytest
import torch

from kernels.reference import wkv7_reference
from models.layers import RMSNorm
from models.rad_rwkv7 import decay_init
from models.rwkv7 import RWKV7TimeMix
from models.student import StudentConfig, build_student, resolve
from models.teacher import FrozenTeacher
from tests.models.test_rad_rwkv7 import randomize, shape
from tests.models.test_student import FAMILIES, assert_heads_are_teacher_heads, make_teacher, teacher_qkv


def make_layer(layer_id: int, sh=None, **cfg) -> RWKV7TimeMix:
    sh = sh or shape()
    return RWKV7TimeMix(sh, resolve(StudentConfig(**cfg), sh), layer_id).double()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def shifted(x, prev):
    """x_{t-1} for x [B, T, C], with prev [B, C] (or zeros) before the first token."""
    prev = torch.zeros_like(x[:, 0]) if prev is None else prev
    return torch.stack([prev] + [x[:, t - 1] for t in range(1, x.shape[1])], dim=1)


def linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def rms_heads(y, norm, D):
    """Per-head RMSNorm over heads of size D (Qwen3 q_norm/k_norm) or nothing: [B, T, h*D]."""
    if not isinstance(norm, RMSNorm):
        return y
    B, T, _ = y.shape
    y = y.view(B, T, -1, D)
    y32 = y.float()  # the teachers' RMSNorm normalizes in float32 whatever the input dtype
    y = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(y.dtype) * norm.weight
    return y.view(B, T, -1)


def norm_head(y_h, ln_x, h, N):
    """Head h of y [B, T, N]: GroupNorm with eps 64e-5 and its slice of the affine, or y / sqrt(N)."""
    if ln_x is None:
        return y_h / math.sqrt(N)
    assert ln_x.eps == 64e-5
    mean, var = y_h.mean(-1, keepdim=True), y_h.var(-1, unbiased=False, keepdim=True)
    sl = slice(h * N, (h + 1) * N)
    return (y_h - mean) / torch.sqrt(var + 64e-5) * ln_x.weight[sl] + ln_x.bias[sl]


def reference_rwkv7(tm, x, v_first, prev=None, S0=None):
    """DESIGN §4 RWKV-7, head by head, over the step-by-step WKV7 reference; prev [B, C] and S0
    [B, H, N, N] are the carried token-shift input and WKV state. -> (o, v_first, S_T)."""
    B, T, C = x.shape
    D, N = tm.head_dim, tm.head_size
    H = tm.q_proj.out_features // N
    xx = shifted(x, prev) - x
    xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (tm.x_r, tm.x_w, tm.x_k, tm.x_v, tm.x_a, tm.x_g))
    r = rms_heads(linear(xr, tm.q_proj), tm.q_norm, D)
    k = rms_heads(linear(xk, tm.k_proj), tm.k_norm, D)
    v = linear(xv, tm.v_proj)
    lw, la, lg, lv = tm.w_lora, tm.a_lora, tm.g_lora, tm.v_lora
    log_w = -math.exp(-0.5) * torch.sigmoid(lw.bias + torch.tanh(xw @ lw.down) @ lw.up)
    a = torch.sigmoid(la.bias + xa @ la.down @ la.up)
    g = torch.sigmoid(xg @ lg.down) @ lg.up
    if lv is None:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(lv.bias + xv @ lv.down @ lv.up)
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    kk = heads(k * tm.k_k)
    kk = (kk / kk.norm(dim=-1, keepdim=True)).view(B, T, -1)
    k_tilde = k * (1 + (a - 1) * tm.k_a)
    y, S = wkv7_reference(*map(heads, (r, log_w, k_tilde, v, -kk, kk * a)),
                          initial_state=S0, output_final_state=True)
    out = []
    for h in range(H):
        r_h, k_h, v_h = heads(r)[:, :, h], heads(k_tilde)[:, :, h], heads(v)[:, :, h]
        bonus = (r_h * k_h * tm.r_k[h]).sum(-1, keepdim=True) * v_h
        out.append(norm_head(y[:, :, h], tm.ln_x, h, N) + bonus)
    return linear(torch.cat(out, dim=-1) * g, tm.o_proj), v_first, S


@pytest.mark.parametrize("head_size,groupnorm", [(8, True), (16, True), (32, False)])
def test_matches_design_formulas_from_a_carried_state(head_size, groupnorm):
    torch.manual_seed(0)
    B, T, C = 2, 7, 32
    H = C // head_size
    layers = [make_layer(i, head_size=head_size, groupnorm=groupnorm) for i in (0, 1)]
    for layer in layers:
        randomize(layer)
    x0, x1 = torch.randn(2, B, T, C, dtype=torch.float64)
    prev = torch.randn(B, C, dtype=torch.float64)
    S0 = torch.randn(B, H, head_size, head_size, dtype=torch.float64)
    out0, v_first, state0 = layers[0](x0, None, None)
    out1, v_first_after, state1 = layers[1](x1, None, v_first, {"shift": prev, "wkv": S0})
    ref0, ref_v_first, ref_S0 = reference_rwkv7(layers[0], x0, None)
    ref1, _, ref_S1 = reference_rwkv7(layers[1], x1, ref_v_first, prev, S0)
    assert rel(out0, ref0) <= 1e-10 and rel(out1, ref1) <= 1e-10
    assert rel(state0["wkv"], ref_S0) <= 1e-10 and rel(state1["wkv"], ref_S1) <= 1e-10
    assert torch.equal(state1["shift"], x1[:, -1])
    assert rel(v_first, ref_v_first) <= 1e-14  # float64 rounding: fused addmm vs x @ W.T + b
    assert v_first_after is v_first
    # every term shows: the carried state, the bonus
    assert rel(layers[1](x1, None, v_first)[0], out1) > 1e-3
    with torch.no_grad():
        layers[1].r_k.zero_()
    assert rel(layers[1](x1, None, v_first, {"shift": prev, "wkv": S0})[0], out1) > 1e-3


def test_init_values():
    L, C = 3, 32
    exponents = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}
    for layer_id in range(L):
        tm = make_layer(layer_id)
        for name, e in exponents.items():
            mu = getattr(tm, name)
            for n in (0, 5, 20, C - 1):
                assert mu[n].item() == pytest.approx(1 - (n / C) ** (e * (1 - layer_id / L)), abs=1e-6)
        assert tm.r_k.shape == (4, 8) and torch.all(tm.r_k == 0)
        torch.testing.assert_close(tm.w_lora.bias, decay_init(layer_id, L, C), rtol=0, atol=1e-6)
        torch.testing.assert_close(tm.k_k, torch.full_like(tm.k_k, 0.85), rtol=0, atol=1e-7)
        assert torch.all(tm.k_a == 1) and tm.ln_x.eps == 64e-5
        assert (tm.v_lora is None) == (layer_id == 0)
        assert tm.k_proj.weight.shape == tm.v_proj.weight.shape == (32, 32)  # full width


@pytest.mark.parametrize("family", FAMILIES)
def test_built_from_a_gqa_teacher_k_and_v_are_the_repeated_teacher_heads(family):
    teacher = make_teacher(family, num_hidden_layers=2)  # 4 query heads over 2 KV heads
    student = build_student(teacher, StudentConfig(time_mix="rwkv7"))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.layers, strict=True)):
        tm = s_layer.time_mix
        rkv = tm.qkv(x, None)  # full-width k, v: [B, T, 4, 8] each
        assert_heads_are_teacher_heads(rkv, teacher_qkv(teacher, i, x, rope=False))
        assert torch.equal(tm.o_proj.weight, t_layer.self_attn.o_proj.weight)


def test_rebuild_loads_full_width_weights_and_mha_teachers_need_no_widening():
    teacher = make_teacher("qwen2")
    trained = build_student(teacher, StudentConfig(time_mix="rwkv7", ffn="rwkv"))
    randomize(trained)
    rebuilt = build_student(teacher, trained.config)
    rebuilt.load_state_dict(trained.state_dict())  # full-width k/v: the widening hook leaves them
    ids = torch.randint(0, 61, (1, 6))
    torch.testing.assert_close(rebuilt.logits(ids), trained.logits(ids), rtol=0, atol=0)
    mha = make_teacher("llama", num_key_value_heads=4)
    tm = build_student(mha, StudentConfig(time_mix="rwkv7")).layers[1].time_mix
    assert torch.equal(tm.k_proj.weight, mha.model.layers[1].self_attn.k_proj.weight)


def assert_chunking_invariant(run, T: int, split: int = 3) -> None:
    """run(t0, t1, state) -> (out [B, t1 - t0, C], new state): one call over T, token by token
    without autograd (the step kernels) and two chunks with autograd agree, outputs and states."""
    full, full_state = run(0, T, None)
    with torch.no_grad():
        state, steps = None, []
        for t in range(T):
            out, state = run(t, t + 1, state)
            steps.append(out)
    first, mid = run(0, split, None)
    second, last = run(split, T, mid)
    assert rel(torch.cat(steps, dim=1), full) <= 1e-10
    assert rel(torch.cat((first, second), dim=1), full) <= 1e-10
    for got in (state, last):
        assert got.keys() == full_state.keys()
        for key in full_state:
            assert rel(got[key], full_state[key]) <= 1e-10, key


@pytest.mark.parametrize("layer_id", [0, 1])
def test_parallel_step_and_chunks_agree(layer_id):
    torch.manual_seed(3)
    tm = make_layer(layer_id, head_size=16)
    randomize(tm)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    v_first = torch.randn(2, 8, 32, dtype=torch.float64)

    def run(t0, t1, state):
        out, _, state = tm(x[:, t0:t1], None, v_first[:, t0:t1] if layer_id else None, state)
        return out, state

    assert_chunking_invariant(run, 8)


def test_gradients_reach_every_parameter_and_the_carried_state():
    torch.manual_seed(2)
    tm = make_layer(1, head_size=16)
    randomize(tm)  # at init W2/A2/V2/G2 see a zero LoRA input (W1 = ... = 0): no gradient
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    v_first = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    state = {"shift": torch.randn(2, 32, dtype=torch.float64, requires_grad=True),
             "wkv": torch.randn(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)}
    out, _, new = tm(x, None, v_first, state)
    (out.square().sum() + new["wkv"].square().sum()).backward()
    for name, p in tm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (v_first, state["shift"], state["wkv"]):
        assert t.grad.abs().sum() > 0


def align_losses(time_mix: str, steps: int = 20) -> tuple[float, float]:
    """The align-stage loss (mean over layers of ||y_teacher - y_student|| / sqrt(C)) of a student
    built from a float32 qwen2 teacher, before and after `steps` Adam steps on its time mixes."""
    torch.manual_seed(0)
    teacher = make_teacher("qwen2", dtype=torch.float32)
    target = FrozenTeacher(teacher)(torch.randint(0, 61, (2, 12)))
    student = build_student(teacher, StudentConfig(time_mix=time_mix))
    opt = torch.optim.Adam(student.time_mix_parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        outs = student.time_mix_outputs(target.attn_inputs)
        return torch.stack([(o - t).norm(dim=-1).mean() / 32 ** 0.5
                            for o, t in zip(outs, target.attn_outputs, strict=True)]).mean()

    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first, loss_fn().item()


def test_align_training_fits_the_teacher_attention():
    first, last = align_losses("rwkv7")  # measured: 0.84 -> 0.20
    assert last < 0.3 * first, (first, last)
