"""The teacher's softmax attention, kept in the layers a hybrid student lists in
`attention_layers` (DESIGN §4, hybrid option): copied from the teacher, trainable.

Shapes: B batch, T new tokens, P tokens already cached, S = P + T keys, C model width,
H_t query heads and H_kv KV heads of size D.
Recurrent state (the protocol of models/student.py): the KV cache {"k", "v"}, each [B, H_kv, S, D],
keys after q/k norm and RoPE. It grows by T per call, as softmax attention must.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers import TeacherProjections

if TYPE_CHECKING:
    from models.student import StudentConfig, TeacherShape


def causal_mask(T: int, S: int, window: int | None, device: torch.device) -> Tensor:
    """[T, S] bool, True where query t (absolute position S - T + t) may read key s: s <= its
    position and, with a sliding window, s > position - window (the HF convention)."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=device)[None]  # [1, S]
    mask = k_pos <= q_pos
    return mask if window is None else mask & (k_pos > q_pos - window)


class TeacherAttention(TeacherProjections):
    """o = W_o softmax(q k^T / sqrt(D) + causal mask) v, with the teacher's projections, q/k norms,
    RoPE, GQA and sliding window (Mistral, windowed Qwen layers)."""

    uses_rope = True

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__(shape)
        self.window = None if shape.sliding_windows is None else shape.sliding_windows[layer_id]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                state: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """x: [B, T, C] normalized layer input; rope: (cos, sin) [1, T, D] at the tokens' absolute
        positions; v_first passes through untouched (RWKV layers make it); state: None or the
        KV cache {"k", "v"} [B, H_kv, P, D]. Returns (o [B, T, C], v_first, the cache with these T)."""
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, rope))  # [B, H_t | H_kv, T, D]
        if state is not None:
            k = torch.cat((state["k"], k), dim=2)  # [B, H_kv, S, D]
            v = torch.cat((state["v"], v), dim=2)
        S = k.shape[2]
        if S == T and self.window is None:  # plain causal: lets SDPA pick its fused kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_rep > 1)
        else:
            mask = causal_mask(T, S, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_rep > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), v_first, {"k": k, "v": v}
