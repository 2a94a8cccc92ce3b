"""Small pieces shared by the student's layers: RMSNorm, gated MLP, LoRA, RoPE, GQA repeat.

Shapes: B batch, T time, C model width, H heads, D teacher head_dim, r LoRA rank.
RMSNorm, GatedMLP and apply_rope reproduce the Llama-family teacher modules exactly, so
weights copied from a teacher give the teacher's numbers.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """down(act(gate(x)) * up(x)): the Llama-family MLP."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r} is not supported; valid: {sorted(ACTIVATIONS)}")
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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
