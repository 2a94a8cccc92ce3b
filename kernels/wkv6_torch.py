"""Chunked pure-PyTorch WKV6 (any device, gradients by autograd). Derivation: DERIVATION.md.

Shapes: B batch, T time, H heads, K = V = N channels, NC chunks of C tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.wkv7_torch import ChunkLayout, chunk_log_decays, compute_dtype, decay_pairs, scan_chunks

CHUNK = 16  # with log w >= -5 the in-chunk decay factors stay within e^{+-45} (DERIVATION.md)


def _chunk_wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
                layout: ChunkLayout, S0: Tensor) -> tuple[Tensor, Tensor]:
    """WKV6 on chunked inputs [B, H, NC, C, N] (compute dtype, r already scaled), u [H, 1, 1, K],
    S0 [B or n_seqs, H, K, V]. Returns o [B, H, NC, C, V] and the final states. DERIVATION.md §WKV6.
    """
    g, g_ex, g_out, g_ref = chunk_log_decays(w)
    A = decay_pairs(r * (g_ex - g_ref).exp(), k * (g_ref - g).exp(), r, k, -1)  # [.., C, C] s < t
    bonus = (r * u * k).sum(-1, keepdim=True)  # [.., C, 1] the current token, weighted by u
    O_in = A @ v + bonus * v                   # [.., C, V]
    X = (k * g_out.exp()).mT @ v               # [.., K, V] S_C = e^{g_C} S0 + X
    entering, S_T = scan_chunks(g[..., -1:, :].mT.exp(), X, layout, S0)
    return O_in + (r * g_ex.exp()) @ entering, S_T


def wkv6_torch(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """o_t = S_{t-1}^T (scale r_t) + (scale r_t . (u * k_t)) v_t;  S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T.

    r, k, v, w: [B, T, H, N], w the log decay; u: [H, N]; initial_state [B or n_seqs, H, K, V].
    Returns o [B, T, H, V] in v's dtype and, if asked, the final state [B or n_seqs, H, K, V]
    in float32 (float64 for float64 inputs). Inputs are assumed valid (kernels.wkv6 checks them).
    """
    dt = compute_dtype(r, k, v, w, u)
    layout = ChunkLayout.of(r.shape[1], CHUNK, cu_seqlens)
    rc, kc, vc, wc = (layout.to_chunks(x.to(dt)) for x in (r, k, v, w))
    H, N = u.shape
    u_c = u.to(dt).view(H, 1, 1, N)            # [H, 1, 1, K] against [B, H, NC, C, K]
    o, s_T = _chunk_wkv6(rc * scale, kc, vc, wc, u_c, layout, layout.start_state(initial_state, r, dt))
    return layout.from_chunks(o).to(v.dtype), (s_T if output_final_state else None)


def wkv6_step_torch(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor,
    *, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One token: r, k, v, w [B, H, N], u [H, N], state [B, H, K, V] -> (o [B, H, V] in v's dtype, new state)."""
    dt = compute_dtype(r, k, v, w, u, state)
    out_dtype = v.dtype
    r, k, v, w, u, S = (x.to(dt) for x in (r, k, v, w, u, state))
    r = scale * r
    bonus = (r * u * k).sum(-1, keepdim=True) * v            # [B, H, V]
    o = torch.einsum("bhk,bhkv->bhv", r, S) + bonus
    S = w.exp()[..., None] * S + k[..., None] * v[..., None, :]
    return o.to(out_dtype), S
