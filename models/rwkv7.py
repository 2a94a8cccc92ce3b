"""Vanilla RWKV-7 time mix (DESIGN §4): token shift with learned lerps, full-width r/k/v without
RoPE and the r.k bonus, so a fully RWKV-7 student can be made from any teacher and exported to
the native RWKV-7 layout by renaming.

Shapes: B batch, T time, C model width, A = H_t * D attention width, H_t teacher heads of size D,
H_kv teacher KV heads, H = A / N student heads of size N.
Recurrent state (the protocol of models/student.py): {"shift": [B, C] the last token's input,
"wkv": [B, H, N, N] the WKV state after it}.

Native RWKV-7 names of the parameters: q_proj/k_proj/v_proj/o_proj = receptance/key/value/output
(the teacher's names, so build_student copies them by key), {w,a,v,g}_lora.{bias,down,up} =
{w,a,v}0, {w,a,v,g}1, {w,a,v,g}2; x_r..x_g, k_k, k_a, r_k, ln_x as they are (native vectors are
[1, 1, C]). A teacher's q/k/v biases (Qwen2) and q/k norms (Qwen3) are kept, as in RAD-RWKV7; the
native layout has neither, so only students of teachers without them (Llama, Mistral) map exactly.
Choice DESIGN §4 leaves open: r_k starts at 0 (the reference uses -0.04). The WKV7 readout uses the
state after the current token, so the teacher's attention to the current token is already there;
a bonus at init would count it twice. Training grows r_k (its gradient is not blocked at 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.layers import normalize_heads, start_wkv, token_shift
from models.rad_rwkv7 import RadRWKV7

if TYPE_CHECKING:
    from models.student import StudentConfig, TeacherShape

# the reference model's lerp exponents, times 1 - l/L: smaller = more of the previous token
LERP_EXPONENTS = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}


def shift_lerp_init(dim: int, exponent: float) -> Tensor:
    """mu_n = 1 - (n / dim)^exponent, [dim] float64: the RWKV reference token-shift lerp init
    (mu_0 = 1 takes the previous token fully; mu_n falls towards 0 over the channels)."""
    return 1 - (torch.arange(dim, dtype=torch.float64) / dim) ** exponent


def widen_kv(module: RWKV7TimeMix, state_dict: dict[str, Tensor], prefix: str, *args) -> None:
    """load_state_dict pre-hook: a GQA teacher's k_proj/v_proj ([H_kv * D] rows) are repeated per
    KV head to the full width [H_t * D], head h reading KV head h // n_rep as repeat_kv does."""
    if module.n_rep == 1:
        return
    for key in (f"{prefix}{name}.{p}" for name in ("k_proj", "v_proj") for p in ("weight", "bias")):
        t = state_dict.get(key)
        if t is not None and t.shape[0] * module.n_rep == module.q_proj.out_features:
            heads = t.reshape(-1, module.head_dim, *t.shape[1:])  # [H_kv, D, (C)]
            state_dict[key] = heads.repeat_interleave(module.n_rep, dim=0).flatten(0, 1)


class RWKV7TimeMix(RadRWKV7):
    """o = W_o((norm(WKV7(r, log w, k~, v, -kk, kk*a)) + (sum_head r * k~ * r_k) v) * g) with
    r, k, v, w, a, g of the token-shifted inputs x_* = x + (shift(x) - x) * x_*.

    RAD-RWKV7's parameters and init, except: k_proj/v_proj are full width (a GQA teacher's rows
    repeated on load, so at init k_proj(x) is the teacher's repeated k without RoPE), no RoPE,
    and the lerps x_* (reference init, 1 - (n/C)^(e (1 - l/L))) and the bonus r_k are added.
    """

    uses_rope = False

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__(shape, cfg, layer_id)
        C, A = shape.hidden_size, shape.num_heads * shape.head_dim
        self.k_proj = nn.Linear(C, A, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(C, A, bias=shape.qkv_bias)
        self.register_load_state_dict_pre_hook(widen_kv)
        depth = 1 - layer_id / shape.num_layers  # 1 in layer 0 down to 1/L
        for name, exponent in LERP_EXPONENTS.items():
            self.register_parameter(name, nn.Parameter(shift_lerp_init(C, exponent * depth).float()))
        self.r_k = nn.Parameter(torch.zeros(A // cfg.head_size, cfg.head_size))  # [H, N]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                state: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """x: [B, T, C] normalized layer input; rope unused (no RoPE); v_first: [B, T, A] the
        first RWKV layer's v (None in that layer); state {"shift": [B, C], "wkv": [B, H, N, N]}
        or None for a fresh sequence. Returns (o [B, T, C], v_first, the state after the last token)."""
        B, T, _ = x.shape
        N = self.head_size
        xx = token_shift(x, state) - x
        xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, name) for name in LERP_EXPONENTS)
        r, k, v = (t.reshape(B, T, -1) for t in self.qkv(xr, None, xk, xv))  # [B, T, A] (k, v full width)
        operands, v_first = self.wkv7_operands(k, v, v_first, xw, xa, xv)
        heads = [t.view(B, T, -1, N) for t in (r, *operands)]  # [B, T, H, N]
        y, wkv = self.wkv(heads, start_wkv(state, self.initial_state, B))
        y = normalize_heads(y.reshape(B, T, -1), self.ln_x, N)  # [B, T, A]
        r, k, v = heads[0], heads[2], heads[3]  # r, k~, mixed v [B, T, H, N]
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # [B, T, H, N]
        out = self.o_proj((y + bonus.view(B, T, -1)) * self.g_lora(xg))
        return out, v_first, {"shift": x[:, -1], "wkv": wkv}
