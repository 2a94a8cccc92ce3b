"""RWKV-7 channel mix (DESIGN §4, ffn=rwkv): a squared-ReLU MLP on a token-shifted input.

Shapes: B batch, T time, C model width, F hidden width (the teacher's intermediate_size).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.layers import token_shift
from models.rwkv7 import shift_lerp_init

if TYPE_CHECKING:
    from models.student import StudentConfig, TeacherShape


class RWKV7ChannelMix(nn.Module):
    """out = W_v relu(W_k x_k)^2 with x_k = x + (shift(x) - x) * x_k; new weights, not the teacher's.

    Init as the RWKV-7 reference: W_k uniform in +-0.5/sqrt(C), W_v = 0 (the block's FFN adds
    nothing at init), x_k = 1 - (n/C)^((1 - l/L)^4).
    """

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__()
        C, F = shape.hidden_size, shape.intermediate_size
        depth = 1 - layer_id / shape.num_layers  # 1 in layer 0 down to 1/L
        self.x_k = nn.Parameter(shift_lerp_init(C, depth ** 4).float())
        self.key = nn.Linear(C, F, bias=False)
        self.value = nn.Linear(F, C, bias=False)
        with torch.no_grad():
            self.key.weight.uniform_(-0.5 / math.sqrt(C), 0.5 / math.sqrt(C))
            self.value.weight.zero_()

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: [B, T, C]; state {"shift": [B, C]} (the previous token's x) or None for a fresh
        sequence. Returns (out [B, T, C], {"shift": x[:, -1]})."""
        xk = x + (token_shift(x, state) - x) * self.x_k
        k = torch.relu(self.key(xk)).square()  # [B, T, F]
        return self.value(k), {"shift": x[:, -1]}
