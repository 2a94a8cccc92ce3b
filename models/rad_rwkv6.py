"""RAD-RWKV6 time mix (DESIGN §4): the teacher's q/k/v/o projections (no RoPE) behind RWKV-6's
data-dependent token shift, feeding a WKV6 recurrence with data-dependent decay and state balancing.

Shapes: B batch, T time, C model width, A = H_t * D attention width, H_t teacher heads of size D,
H_kv teacher KV heads, H = A / N student heads of size N, R token-shift LoRA rank.

Choices DESIGN §4 leaves open:
- u (WKV6's bonus for the current token) is a parameter starting at 0: at init the current token
  reaches the output only through the state, as the teacher's keys do through softmax; training
  may grow it.
- y is normalized like RAD-RWKV7's: GroupNorm_H(y) (eps 64e-5, as RWKV-6), or y / sqrt(N) with
  groupnorm=false, before the gate.
- The token-shift LoRA is RWKV-6's: one rank-R tanh LoRA per target over the shared input
  x + dx * mu_x (block-diagonal M1, M2), R = 32 (64 from C = 4096 on), biased by mu_*; M2 starts
  orthogonal with gain 0.1 like every other LoRA here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import kernels
from models.layers import (LoRA, TeacherProjections, learned_initial_state, normalize_heads, repeat_kv, start_wkv,
                           token_shift)

if TYPE_CHECKING:
    from models.student import StudentConfig, TeacherShape

SHIFT_TARGETS = ("r", "k", "v", "w", "g")
MIN_LOG_DECAY = -5.0  # log w floor: the decay e^{log w} stays >= e^-5


def decay_init_rwkv6(layer_id: int, n_layers: int, dim: int) -> Tensor:
    """d0_n = -6 + 5 (n/(dim-1))^(0.7 + 1.3 l/(L-1)), [dim]; l/(L-1) = 0 when L = 1."""
    ratio = layer_id / (n_layers - 1) if n_layers > 1 else 0.0
    n = torch.arange(dim, dtype=torch.float64)
    return -6 + 5 * (n / (dim - 1)) ** (0.7 + 1.3 * ratio)


def shift_rank(dim: int) -> int:
    """RWKV-6's token-shift LoRA rank (D_MIX_LORA): 32, or 64 for models 4096 wide or wider."""
    return 32 if dim < 4096 else 64


def wkv6_with_state(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, wkv: Tensor | None,
                    backend: str) -> tuple[Tensor, Tensor]:
    """kernels.wkv6 from state wkv ([B, H, N, N], None = zeros) over r, k, v, w [B, T, H, N].
    Returns y [B, T, H, N] and the state after the last token [B, H, N, N]; a single token without
    autograd takes the recurrent step kernel (same math, no chunking)."""
    if r.shape[1] == 1 and not torch.is_grad_enabled():
        B, _, H, N = r.shape
        if wkv is None:
            wkv = r.new_zeros(B, H, N, N, dtype=torch.promote_types(r.dtype, torch.float32))
        y, wkv = kernels.wkv6_step(r[:, 0], k[:, 0], v[:, 0], w[:, 0], u, wkv, backend=backend)
        return y[:, None], wkv
    return kernels.wkv6(r, k, v, w, u, initial_state=wkv, output_final_state=True, backend=backend)


class RadRWKV6(TeacherProjections):
    """o = W_o(norm(WKV6(r, log w, k * (1 - e^{log w}), v, u)) * sigmoid(W_g x_g)), r/k/v the
    teacher's q/k/v (GQA repeated, no RoPE) of the token-shifted inputs x_r, x_k, x_v."""

    uses_rope = False

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__(shape)
        C = shape.hidden_size
        A = shape.num_heads * shape.head_dim
        self.head_size = N = cfg.head_size
        self.backend = cfg.backend

        self.mu_x = nn.Parameter(torch.zeros(C))
        # x_* = x + dx * (mu_* + m_*): LoRA bias mu_* = 0 and M1 = 0 make every x_* = x at init
        self.shift_lora = nn.ModuleDict({t: LoRA(C, shift_rank(C), C, act=torch.tanh)
                                         for t in SHIFT_TARGETS})
        self.w_lora = LoRA(C, cfg.w_lora, A, act=torch.tanh)
        with torch.no_grad():
            self.w_lora.bias.copy_(decay_init_rwkv6(layer_id, shape.num_layers, A))
        self.u = nn.Parameter(torch.zeros(A // N, N))
        self.gate = nn.Linear(C, A, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.ln_x = nn.GroupNorm(A // N, A, eps=64e-5) if cfg.groupnorm else None
        self.initial_state = learned_initial_state(cfg.learned_initial_state, A // N, N)  # state tuning

    def shifted_inputs(self, x: Tensor, state: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """x: [B, T, C] -> {"r", "k", "v", "w", "g": [B, T, C]}, RWKV-6's data-dependent lerps."""
        dx = token_shift(x, state) - x
        xx = x + dx * self.mu_x
        return {t: x + dx * lora(xx) for t, lora in self.shift_lora.items()}

    def rkv(self, xs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's q, k, v (+q/k norm, GQA repeat, no RoPE) of x_r, x_k, x_v: [B, T, A] each."""
        B, T, _ = xs["r"].shape
        r, k, v = self.qkv(xs["r"], None, xs["k"], xs["v"])  # [B, T, H_t | H_kv, D]
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, T, H_t, D]
        return r.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                state: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """x: [B, T, C] normalized layer input; rope unused (no RoPE); v_first passes through
        (RWKV-6 has no value residual); state {"shift": [B, C], "wkv": [B, H, N, N]} or None.
        Returns (o [B, T, C], v_first, the state after the last token)."""
        B, T, _ = x.shape
        N = self.head_size
        xs = self.shifted_inputs(x, state)
        r, k, v = self.rkv(xs)  # [B, T, A]
        log_w = (-torch.exp(self.w_lora(xs["w"]))).clamp(min=MIN_LOG_DECAY)
        k = k * -torch.expm1(log_w)  # state balancing: k * (1 - e^{log w})
        heads = (t.view(B, T, -1, N) for t in (r, k, v, log_w))  # [B, T, H, N]
        y, wkv = wkv6_with_state(*heads, self.u, start_wkv(state, self.initial_state, B), self.backend)
        y = normalize_heads(y.reshape(B, T, -1), self.ln_x, N)  # [B, T, A]
        out = self.o_proj(y * torch.sigmoid(self.gate(xs["g"])))
        return out, v_first, {"shift": x[:, -1], "wkv": wkv}
