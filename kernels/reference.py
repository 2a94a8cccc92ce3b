"""Step-by-step WKV recurrences: the ground truth every other backend is tested against.

Shapes: B batch, T time, H heads, K = V = N channels per head.
Inputs r, w, k, v, a, b: [B, T, H, N]; u: [H, N]; state S: [B, H, K, V].
w is the LOG decay (<= 0). Everything is computed in float32 or wider (float64 in tests);
the output is cast back to the input dtype, the final state stays in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _segments(T: int, B: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(i, 0, T) for i in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _initial(initial_state: Tensor | None, n: int, H: int, K: int, V: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return like.new_zeros(n, H, K, V)
    return initial_state.to(like.dtype)


def wkv7_reference(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = S_t^T (scale r_t)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = _compute_dtype(r)
    out_dtype = v.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    segments = _segments(T, B, cu_seqlens)
    state = _initial(initial_state, len(segments), H, K, V, r)
    out = r.new_zeros(B, T, H, V)
    finals = []
    for n, (row, start, end) in enumerate(segments):
        S = state[n]  # [H, K, V]
        for t in range(start, end):
            sa = torch.einsum("hk,hkv->hv", a[row, t], S)  # a^T S, before the decay
            S = (w[row, t].exp()[:, :, None] * S
                 + b[row, t][:, :, None] * sa[:, None, :]
                 + k[row, t][:, :, None] * v[row, t][:, None, :])
            out[row, t] = torch.einsum("hk,hkv->hv", scale * r[row, t], S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return out.to(out_dtype), final


def wkv6_reference(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """o_t = S_{t-1}^T (scale r_t) + (scale r_t . (u * k_t)) v_t;  S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = _compute_dtype(r)
    out_dtype = v.dtype
    r, k, v, w, u = (x.to(dt) for x in (r, k, v, w, u))
    segments = _segments(T, B, cu_seqlens)
    state = _initial(initial_state, len(segments), H, K, V, r)
    out = r.new_zeros(B, T, H, V)
    finals = []
    for n, (row, start, end) in enumerate(segments):
        S = state[n]  # [H, K, V]
        for t in range(start, end):
            rt = scale * r[row, t]  # [H, K]
            bonus = (rt * u * k[row, t]).sum(-1, keepdim=True) * v[row, t]  # [H, V]
            out[row, t] = torch.einsum("hk,hkv->hv", rt, S) + bonus
            S = w[row, t].exp()[:, :, None] * S + k[row, t][:, :, None] * v[row, t][:, None, :]
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return out.to(out_dtype), final
