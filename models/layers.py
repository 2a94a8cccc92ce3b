"""Small pieces shared by the student's layers: RMSNorm, gated MLP, LoRA, RoPE, GQA repeat,
the teacher's attention projections, token shift, the WKV state a sequence starts from.

Shapes: B batch, T time, C model width, H heads, D teacher head_dim, r LoRA rank.
RMSNorm, GatedMLP, apply_rope and TeacherProjections reproduce the Llama-family teacher modules
exactly, so weights copied from a teacher give the teacher's numbers.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from models.student import TeacherShape

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalized in float32 like the HF teachers."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the Llama-family MLP. Stateless, so it follows the FFN
    protocol of models/student.py with an empty state: forward(x, state) -> (out, {})."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; valid: {sorted(ACTIVATIONS)}")
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """x: [B, T, C] -> ([B, T, C], {}); each token on its own, so there is nothing to carry."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)), {}


class LoRA(nn.Module):
    """x -> bias + act(x @ down) @ up, the RWKV-7 low-rank form (w0 + tanh(x W1) W2 etc.).

    down: [C_in, r] starts at zero, so the LoRA starts as its bias (or as zero without one);
    up: [r, C_out] starts orthogonal with gain 0.1 (DESIGN §4).
    """

    def __init__(self, dim_in: int, rank: int, dim_out: int,
                 act: Callable[[Tensor], Tensor] | None = None, bias: bool = True) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.zeros(dim_in, rank))
        self.up = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, dim_out), gain=0.1))
        self.bias = nn.Parameter(torch.zeros(dim_out)) if bias else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.down  # [B, T, r]
        if self.act is not None:
            h = self.act(h)
        y = h @ self.up  # [B, T, C_out]
        return y if self.bias is None else y + self.bias


def rotate_half(x: Tensor) -> Tensor:
    """[..., D] -> [-x2, x1] with x1, x2 the two halves: the rotate_half RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; cos, sin: [B or 1, T, D] as the teacher's rotary_emb returns them."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, T, H_kv, D] -> [B, T, H_kv * n_rep, D]; head h reads KV head h // n_rep (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def normalize_heads(y: Tensor, ln_x: nn.GroupNorm | None, N: int) -> Tensor:
    """y: [B, T, A] -> GroupNorm over each head of size N, or y / sqrt(N) without ln_x."""
    B, T, _ = y.shape
    if ln_x is None:
        return y / math.sqrt(N)
    return ln_x(y.reshape(B * T, -1)).view(B, T, -1)  # reshape: a backend may return y non-contiguous


def token_shift(x: Tensor, state: dict[str, Tensor] | None) -> Tensor:
    """x: [B, T, C] -> x_{t-1}: [B, T, C]. Before the first token comes state["shift"] ([B, C], the
    previous chunk's last input) or zeros for a fresh sequence; the new state's "shift" is x[:, -1]."""
    prev = x.new_zeros(x.shape[0], 1, x.shape[2]) if state is None else state["shift"][:, None]
    return torch.cat((prev, x[:, :-1]), dim=1)


class TeacherProjections(nn.Module):
    """The teacher attention's q/k/v/o projections (+ Qwen3 q_norm/k_norm) under the teacher's
    names, so that build_student copies them by state_dict key. Base of every time mix that reuses
    them (converted RWKV layers and the kept softmax attention)."""

    def __init__(self, shape: TeacherShape) -> None:
        super().__init__()
        C, D, H_kv = shape.hidden_size, shape.head_dim, shape.num_kv_heads
        self.head_dim = D
        self.n_rep = shape.num_heads // H_kv  # query heads per KV head (GQA)
        self.q_proj = nn.Linear(C, shape.num_heads * D, bias=shape.qkv_bias)
        self.k_proj = nn.Linear(C, H_kv * D, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(C, H_kv * D, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(shape.num_heads * D, C, bias=shape.o_bias)
        self.q_norm = RMSNorm(D, shape.rms_norm_eps) if shape.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(D, shape.rms_norm_eps) if shape.qk_norm else nn.Identity()

    def qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
            xk: Tensor | None = None, xv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, C] -> q [B, T, H_t, D], k [B, T, H_kv, D], v [B, T, H_kv, D] as the teacher makes
        them: projections, q/k norms, then RoPE (cos, sin) on q and k unless rope is None. Token-shift
        layers project other inputs for k and v: xk, xv (default x)."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, -1, D))
        k = self.k_norm(self.k_proj(x if xk is None else xk).view(B, T, -1, D))
        v = self.v_proj(x if xv is None else xv).view(B, T, -1, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v


def learned_initial_state(learned: bool, heads: int, N: int) -> nn.Parameter | None:
    """The WKV state [H, N, N] a fresh sequence starts from, when it is learned (state tuning), else
    None. Zeros at init: a student with it computes exactly what one without computes."""
    return nn.Parameter(torch.zeros(heads, N, N)) if learned else None


def start_wkv(state: dict[str, Tensor] | None, initial: Tensor | None, B: int) -> Tensor | None:
    """The WKV state before the first of the tokens: the carried state["wkv"] [B, H, N, N] when a
    sequence continues; for a fresh one the learned initial state [H, N, N] broadcast over the batch
    (float32, the kernels' state dtype; its gradient sums over the batch), or None (zeros)."""
    if state is not None:
        return state["wkv"]
    return None if initial is None else initial.float().expand(B, *initial.shape)
