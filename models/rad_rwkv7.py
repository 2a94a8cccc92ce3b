"""RAD-RWKV7 time mix (DESIGN §4): the teacher's q/k/v/o projections and RoPE feeding a WKV7
recurrence with data-dependent decay, in-context learning rate and value residual.

Shapes: B batch, T time, C model width, A = H_t * D attention width (= C for most teachers),
H_t teacher heads of size D, H_kv teacher KV heads, H = A / N student heads of size N.
Recurrent state (the protocol of models/student.py): {"wkv": [B, H, N, N]}, the WKV state after
the last token; there is no token shift, so nothing else is carried. A fresh sequence starts from
zeros, or from the learned `initial_state` [H, N, N] with cfg.learned_initial_state (state tuning).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from models.layers import LoRA, TeacherProjections, learned_initial_state, normalize_heads, repeat_kv, start_wkv

if TYPE_CHECKING:
    from models.student import StudentConfig, TeacherShape


def decay_init(layer_id: int, n_layers: int, dim: int) -> Tensor:
    """w0_n = -7 + 5 (n/(dim-1))^(0.85 + sqrt(l/(L-1))) + 0.5, [dim]; l/(L-1) = 0 when L = 1."""
    ratio = layer_id / (n_layers - 1) if n_layers > 1 else 0.0
    n = torch.arange(dim, dtype=torch.float64)
    return -7 + 5 * (n / (dim - 1)) ** (0.85 + math.sqrt(ratio)) + 0.5


class RadRWKV7(TeacherProjections):
    """o = W_o(GroupNorm_H(WKV7(r, log w, k~, v, -kk, kk*a)) * g), r/k with the teacher's RoPE."""

    uses_rope = True

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__(shape)
        C, A = shape.hidden_size, shape.num_heads * shape.head_dim
        self.head_size = cfg.head_size
        self.backend = cfg.backend
        self.w_lora = LoRA(C, cfg.w_lora, A, act=torch.tanh)
        self.a_lora = LoRA(C, cfg.a_lora, A)
        self.g_lora = LoRA(C, cfg.g_lora, A, act=torch.sigmoid, bias=False)
        # the layer that supplies v_first mixes nothing into its own v
        self.v_lora = LoRA(C, cfg.v_lora, A) if layer_id != cfg.v_first_layer else None
        with torch.no_grad():
            self.w_lora.bias.copy_(decay_init(layer_id, shape.num_layers, A))
            if self.v_lora is not None:
                self.v_lora.bias.fill_(1.0)
        self.k_k = nn.Parameter(torch.full((A,), 0.85))
        self.k_a = nn.Parameter(torch.ones(A))
        self.ln_x = nn.GroupNorm(A // cfg.head_size, A, eps=64e-5) if cfg.groupnorm else None
        self.initial_state = learned_initial_state(cfg.learned_initial_state, A // cfg.head_size, cfg.head_size)

    def rkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, C] -> r, k, v: [B, T, A], the teacher's q, k, v (+q/k norm, RoPE, GQA repeat)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)  # [B, T, H_t, D], [B, T, H_kv, D] x 2
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, T, H_t, D]
        return q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                state: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x: [B, T, C] normalized layer input; rope: (cos, sin) [1, T, D] at the tokens' absolute
        positions; v_first: [B, T, A] the first RWKV layer's v (None in that layer); state: None
        for a fresh sequence, else {"wkv": [B, H, N, N]} after the previous token.
        Returns (o [B, T, C], v_first, {"wkv": state after the last token})."""
        B, T, _ = x.shape
        N = self.head_size
        r, k, v = self.rkv(x, rope)  # [B, T, A]
        operands, v_first = self.wkv7_operands(k, v, v_first, x, x, x)
        heads = [t.view(B, T, -1, N) for t in (r, *operands)]  # [B, T, H, N]
        y, s = self.wkv(heads, start_wkv(state, self.initial_state, B))
        y = normalize_heads(y.reshape(B, T, -1), self.ln_x, N)  # [B, T, A]
        return self.o_proj(y * self.g_lora(x)), v_first, {"wkv": s}

    def wkv7_operands(self, k: Tensor, v: Tensor, v_first: Tensor | None, xw: Tensor, xa: Tensor,
                      xv: Tensor) -> tuple[list[Tensor], Tensor]:
        """The WKV7 operands after r from k, v [B, T, A] and the inputs of the w, a, v LoRAs
        xw, xa, xv [B, T, C] (all x here; token-shifted mixes in RWKV-7):
        ([log w, k~, v, -kk, kk * a] each [B, T, A], v_first)."""
        B, T, _ = k.shape
        log_w = -math.exp(-0.5) * torch.sigmoid(self.w_lora(xw))  # decay e^{log w} in (0.545, 1)
        a = torch.sigmoid(self.a_lora(xa))  # in-context learning rate
        kk = F.normalize((k * self.k_k).view(B, T, -1, self.head_size), dim=-1).view(B, T, -1)
        k = k * (1 + (a - 1) * self.k_a)
        if self.v_lora is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v_lora(xv))
        return [log_w, k, v, -kk, kk * a], v_first

    def wkv(self, heads: list[Tensor], s0: Tensor | None) -> tuple[Tensor, Tensor]:
        """heads: r, log w, k, v, a, b [B, T, H, N]; s0: [B, H, N, N] or None (zeros).
        -> (y [B, T, H, N], final state [B, H, N, N]). One token without autograd takes the step
        kernel (the fast generation path; the step kernels are forward-only)."""
        B, T, H, N = heads[0].shape
        if T > 1 or torch.is_grad_enabled():
            return kernels.wkv7(*heads, initial_state=s0, output_final_state=True, backend=self.backend)
        if s0 is None:
            s0 = heads[0].new_zeros(B, H, N, N, dtype=torch.promote_types(heads[0].dtype, torch.float32))
        y, s = kernels.wkv7_step(*(t[:, 0] for t in heads), s0, backend=self.backend)
        return y[:, None], s
