"""RAD-RWKV7 time mix against an independent transcription of DESIGN §4, plus its init values."""

import math

import pytest
import torch

from kernels.reference import wkv7_reference
from models.rad_rwkv7 import RadRWKV7
from models.student import StudentConfig, TeacherShape, resolve


def shape(**overrides) -> TeacherShape:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, hidden_act="silu", rms_norm_eps=1e-6, qkv_bias=True,
                o_bias=False, mlp_bias=False, qk_norm=True)
    return TeacherShape(**{**base, **overrides})


def make_layer(layer_id: int, sh: TeacherShape | None = None, **cfg) -> RadRWKV7:
    sh = sh or shape()
    return RadRWKV7(sh, resolve(StudentConfig(**cfg), sh), layer_id).double()


def random_rope(T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [1, T, D] in the rotate_half layout: both halves carry the same angles."""
    angles = torch.rand(1, T, D // 2, dtype=torch.float64) * 6
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def randomize(module: torch.nn.Module) -> None:
    """Move every parameter off its init so each term of the formulas shows in the output."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def reference_time_mix(tm: RadRWKV7, x, cos, sin, v_first):
    """DESIGN §4 written out head by head, with the step-by-step WKV7 reference."""
    B, T, C = x.shape
    D, N = tm.head_dim, tm.head_size
    Ht = tm.q_proj.out_features // D
    rep = Ht // (tm.k_proj.out_features // D)

    def heads(y, norm):  # [B, T, h*D] -> [B, T, h, D], per-head RMSNorm and RoPE
        y = y.view(B, T, -1, D)
        y32 = y.float()  # the teachers' RMSNorm normalizes in float32 whatever the input dtype
        y = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(y.dtype) * norm.weight
        y1, y2 = y[..., : D // 2], y[..., D // 2:]
        c, s = cos[:, :, None, : D // 2], sin[:, :, None, : D // 2]
        return torch.cat((y1 * c - y2 * s, y2 * c + y1 * s), dim=-1)

    q = heads(x @ tm.q_proj.weight.T + tm.q_proj.bias, tm.q_norm)
    kt = heads(x @ tm.k_proj.weight.T + tm.k_proj.bias, tm.k_norm)
    vt = (x @ tm.v_proj.weight.T + tm.v_proj.bias).view(B, T, -1, D)
    r = q.reshape(B, T, -1)
    k = torch.cat([kt[:, :, h // rep] for h in range(Ht)], dim=-1)  # GQA: head h reads h // rep
    v = torch.cat([vt[:, :, h // rep] for h in range(Ht)], dim=-1)

    lw, la, lg, lv = tm.w_lora, tm.a_lora, tm.g_lora, tm.v_lora
    log_w = -math.exp(-0.5) * torch.sigmoid(lw.bias + torch.tanh(x @ lw.down) @ lw.up)
    a = torch.sigmoid(la.bias + x @ la.down @ la.up)
    g = torch.sigmoid(x @ lg.down) @ lg.up
    kk = (k * tm.k_k).view(B, T, -1, N)
    kk = (kk / kk.norm(dim=-1, keepdim=True)).view(B, T, -1)
    k = k * (1 + (a - 1) * tm.k_a)
    if lv is None:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(lv.bias + x @ lv.down @ lv.up)
    y, _ = wkv7_reference(*(t.view(B, T, -1, N) for t in (r, log_w, k, v, -kk, kk * a)))
    if tm.ln_x is None:
        y = y / math.sqrt(N)
    else:
        mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        y = ((y - mean) / torch.sqrt(var + 64e-5)).reshape(B, T, -1) * tm.ln_x.weight + tm.ln_x.bias
    return (y.reshape(B, T, -1) * g) @ tm.o_proj.weight.T, v_first


@pytest.mark.parametrize("head_size,groupnorm", [(8, True), (16, True), (32, False)])
def test_matches_design_formulas(head_size, groupnorm):
    torch.manual_seed(0)
    B, T, C = 2, 9, 32
    layers = [make_layer(i, head_size=head_size, groupnorm=groupnorm) for i in (0, 1)]
    for layer in layers:
        randomize(layer)
    cos, sin = random_rope(T, 8)
    x0, x1 = torch.randn(2, B, T, C, dtype=torch.float64)
    out0, v_first, _ = layers[0](x0, (cos, sin), None)
    out1, v_first_after, _ = layers[1](x1, (cos, sin), v_first)
    ref0, ref_v_first = reference_time_mix(layers[0], x0, cos, sin, None)
    ref1, _ = reference_time_mix(layers[1], x1, cos, sin, ref_v_first)
    torch.testing.assert_close(out0, ref0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out1, ref1, rtol=1e-10, atol=1e-12)
    # float64 rounding only: nn.Linear's fused addmm and the reference's x @ W.T + b may differ in the last bit
    torch.testing.assert_close(v_first, ref_v_first, rtol=1e-13, atol=1e-15)
    assert v_first_after is v_first  # later layers pass layer 0's v through unchanged


def test_init_values():
    L, C = 3, 32
    for layer_id in range(L):
        tm = make_layer(layer_id)
        exponent = 0.85 + math.sqrt(layer_id / (L - 1))
        for n in (0, 7, 20, C - 1):
            expected = -7 + 5 * (n / (C - 1)) ** exponent + 0.5
            assert tm.w_lora.bias[n].item() == pytest.approx(expected, abs=1e-6)
        loras = [tm.w_lora, tm.a_lora, tm.g_lora] + ([tm.v_lora] if layer_id else [])
        for lora in loras:
            assert torch.count_nonzero(lora.down) == 0
            rank = lora.up.shape[0]  # rank < C: rows orthonormal, times the gain 0.1
            torch.testing.assert_close(lora.up @ lora.up.T, 0.01 * torch.eye(rank, dtype=torch.float64))
        assert torch.all(tm.a_lora.bias == 0) and tm.g_lora.bias is None
        assert (tm.v_lora is None) == (layer_id == 0)
        if layer_id:
            assert torch.all(tm.v_lora.bias == 1)
        torch.testing.assert_close(tm.k_k, torch.full_like(tm.k_k, 0.85), rtol=0, atol=1e-7)
        assert torch.all(tm.k_a == 1)
        assert torch.all(tm.ln_x.weight == 1) and torch.all(tm.ln_x.bias == 0)
        assert tm.ln_x.eps == 64e-5 and tm.ln_x.num_groups == C // 8


def test_single_layer_decay_uses_exponent_085():
    tm = make_layer(0, shape(num_layers=1))
    expected = -7 + 5 * (5 / 31) ** 0.85 + 0.5
    assert tm.w_lora.bias[5].item() == pytest.approx(expected, abs=1e-6)


def test_decay_range_and_finite_output_for_large_inputs():
    torch.manual_seed(1)
    tm = make_layer(1)
    randomize(tm)
    x = 30 * torch.randn(1, 6, 32, dtype=torch.float64)
    w = -math.exp(-0.5) * torch.sigmoid(tm.w_lora(x))
    assert w.exp().min() > 0.545 and w.exp().max() < 1
    out, _, _ = tm(x, random_rope(6, 8), torch.randn(1, 6, 32, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    tm = make_layer(1, head_size=16)
    randomize(tm)  # at init W2 = A2 = V2 see a zero input (W1 = 0), so their gradient is 0
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    v_first = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    out, _, _ = tm(x, random_rope(5, 8), v_first)
    out.square().sum().backward()
    for name, p in tm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert v_first.grad.abs().sum() > 0
