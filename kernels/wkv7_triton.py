"""WKV-7 in Triton: chunked forward and backward, and the recurrent single step.

    S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,   o_t = S_t^T (scale r_t)

Inputs [B, T, H, N] (K = V = N); states [n, H, K, V] fp32. The chunked form (kernels/NOTES.md):
inside a chunk of BT steps with cumulative log decay g (relative to a per-chunk reference, so
no exp over- or underflows), u_t = S_{t-1}^T a_t solves a unit lower-triangular system

    (I - A_ab) U = A0 S_0 + A_ak V,     O = R0 S_0 + A_rb U + A_rk V,
    S_BT = diag(e^{g_BT}) S_0 + Bh^T U + Kh^T V.

Each program owns one head and BV columns of the state (columns evolve independently) and walks
the chunks in order; the backward walks them in reverse with the state saved at each chunk start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.wkv_triton_common import (
    block_v, check_inputs, chunk_layout, dot_precision, reverse_cumsum, seq_bounds, unit_tril_inverse,
)

BT = 16
LOG2_BT = 4


@triton.jit
def _chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Pointers [BT, BD] to rows [i_t*BT, (i_t+1)*BT) and columns [i_d*BD, (i_d+1)*BD) of head i_h
    of the sequence [bos, eos) in a [*, H, D] tensor, and the mask of rows before eos."""
    o_t = bos + i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    return x + (o_t[:, None] * H + i_h) * D + o_d[None, :], (o_t < eos)[:, None]


@triton.jit
def _load_chunk(x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """fp32 [BT, BD] block of a [*, H, D] tensor; zero past eos."""
    p_x, m_x = _chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H, D, BT, BD)
    return tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)


@triton.jit
def _store_chunk(x, b_x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr):
    p_x, m_x = _chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H, D, BT, BD)
    tl.store(p_x, b_x.to(p_x.dtype.element_ty), mask=m_x)


@triton.jit
def _state_ptr(s, i_s, i_v, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """Pointers [K, BV] to columns [i_v*BV, (i_v+1)*BV) of state number i_s in a [*, K, V] tensor."""
    return s + i_s.to(tl.int64) * K * V + tl.arange(0, K)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :]


@triton.jit
def _chunk_decays(b_w):
    """Decay factors of one chunk from its log decays b_w [BT, K] (padded rows have w = 0).

    g = cumsum(w) - ref with ref = g_BT / 2, so every factor that grows stays within half the
    chunk's total log decay (RWKV-6 at w = -5 with BT = 16: e^{+-40}, far inside fp32).
    Returns e^{g_BT} [K] and, each [BT, K]: e^{g}, e^{g - w} (exclusive: a_t meets S_{t-1}), e^{-g},
    the same two measured from the chunk start (e^{G}, e^{G - w}), and e^{G_BT - G} to the chunk end.
    """
    b_G = tl.cumsum(b_w, axis=0)  # [BT, K] inclusive log decay from the chunk start
    b_Gl = tl.sum(b_w, axis=0)  # [K]
    b_g = b_G - 0.5 * b_Gl[None, :]
    return (tl.exp(b_Gl), tl.exp(b_g), tl.exp(b_g - b_w), tl.exp(-b_g), tl.exp(b_G), tl.exp(b_G - b_w),
            tl.exp(b_Gl[None, :] - b_G))


@triton.jit
def _intra(b_x, b_y, m, PREC: tl.constexpr):
    """[BT, BT] masked x y^T."""
    return tl.where(m, tl.dot(b_x, tl.trans(b_y), input_precision=PREC), 0.0)


@triton.jit
def _chunk_u(b_s, b_v, b_a0, b_Aab, b_Aak, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """U [BT, BV] (rows u_t = S_{t-1}^T a_t) and the triangular inverse (I - A_ab)^{-1} [BT, BT]."""
    b_Ti = unit_tril_inverse(b_Aab, BT, LOG2_BT)
    b_x = tl.dot(b_a0, b_s, input_precision=PREC) + tl.dot(b_Aak, b_v, input_precision=PREC)  # [BT, BV]
    return tl.dot(b_Ti, b_x, input_precision=PREC), b_Ti


@triton.jit
def wkv7_fwd_kernel(
    r, w, k, v, a, b, o, h0, ht, hs, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]  # [BT, BT] i < t
    m_i = o_t[:, None] >= o_t[None, :]  # i <= t
    b_s = tl.zeros([K, BV], dtype=tl.float32)
    if USE_H0:
        b_s = tl.load(_state_ptr(h0, i_nh, i_v, K, V, BV)).to(tl.float32)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        if STORE_HS:
            tl.store(_state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV), b_s)
        b_r = _load_chunk(r, bos, eos, i_h, i_t, 0, H, K, BT, K) * scale  # [BT, K]
        b_w = _load_chunk(w, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_k = _load_chunk(k, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_a = _load_chunk(a, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_b = _load_chunk(b, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_v = _load_chunk(v, bos, eos, i_h, i_t, i_v, H, V, BT, BV)  # [BT, BV]
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = _chunk_decays(b_w)
        b_bt, b_kt = b_b * e_ng, b_k * e_ng  # [BT, K]
        b_u, b_Ti = _chunk_u(b_s, b_v, b_a * e_Ge, _intra(b_a * e_ge, b_bt, m_s, PREC),
                             _intra(b_a * e_ge, b_kt, m_s, PREC), BT, LOG2_BT, PREC)  # [BT, BV]
        b_rt = b_r * e_g
        b_o = (tl.dot(b_r * e_G, b_s, input_precision=PREC)
               + tl.dot(_intra(b_rt, b_bt, m_i, PREC), b_u, input_precision=PREC)
               + tl.dot(_intra(b_rt, b_kt, m_i, PREC), b_v, input_precision=PREC))  # [BT, BV]
        _store_chunk(o, b_o, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        b_s = (e_gl[:, None] * b_s + tl.dot(tl.trans(b_b * e_h), b_u, input_precision=PREC)
               + tl.dot(tl.trans(b_k * e_h), b_v, input_precision=PREC))  # [K, BV]
    if STORE_HT:
        tl.store(_state_ptr(ht, i_nh, i_v, K, V, BV), b_s)


@triton.jit
def wkv7_bwd_kernel(
    r, w, k, v, a, b, do, dht, hs, dr, dw, dk, dv, da, db, dh0, cu_seqlens, chunk_offsets, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
):
    """Reverse walk over the chunks carrying dS [K, BV]. dr, dw, dk, da, db are this program's
    partial sums over its BV value columns, written to slice i_v of [NV, NTOK, H, K]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    part = i_v.to(tl.int64) * NTOK * H * K
    dr, dw, dk, da, db = dr + part, dw + part, dk + part, da + part, db + part
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]
    m_i = o_t[:, None] >= o_t[None, :]
    b_ds = tl.zeros([K, BV], dtype=tl.float32)
    if USE_DHT:
        b_ds = tl.load(_state_ptr(dht, i_nh, i_v, K, V, BV)).to(tl.float32)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        b_s = tl.load(_state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV))  # [K, BV] state at chunk start
        b_r = _load_chunk(r, bos, eos, i_h, i_t, 0, H, K, BT, K) * scale  # [BT, K]
        b_w = _load_chunk(w, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_k = _load_chunk(k, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_a = _load_chunk(a, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_b = _load_chunk(b, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_v = _load_chunk(v, bos, eos, i_h, i_t, i_v, H, V, BT, BV)  # [BT, BV]
        b_do = _load_chunk(do, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = _chunk_decays(b_w)
        b_rt, b_at, b_bt, b_kt = b_r * e_g, b_a * e_ge, b_b * e_ng, b_k * e_ng  # [BT, K]
        b_r0, b_a0, b_bh, b_kh = b_r * e_G, b_a * e_Ge, b_b * e_h, b_k * e_h
        b_Aab, b_Aak = _intra(b_at, b_bt, m_s, PREC), _intra(b_at, b_kt, m_s, PREC)  # [BT, BT]
        b_Arb, b_Ark = _intra(b_rt, b_bt, m_i, PREC), _intra(b_rt, b_kt, m_i, PREC)
        b_u, b_Ti = _chunk_u(b_s, b_v, b_a0, b_Aab, b_Aak, BT, LOG2_BT, PREC)  # [BT, BV]
        # value side: U feeds O and S_BT; X = (I - A_ab) U
        b_du = tl.dot(tl.trans(b_Arb), b_do, input_precision=PREC) + tl.dot(b_bh, b_ds, input_precision=PREC)
        b_dx = tl.dot(tl.trans(b_Ti), b_du, input_precision=PREC)  # [BT, BV]
        b_dv = (tl.dot(tl.trans(b_Aak), b_dx, input_precision=PREC)
                + tl.dot(tl.trans(b_Ark), b_do, input_precision=PREC) + tl.dot(b_kh, b_ds, input_precision=PREC))
        _store_chunk(dv, b_dv, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        # intra-chunk matrices [BT, BT]
        b_dAab, b_dAak = _intra(b_dx, b_u, m_s, PREC), _intra(b_dx, b_v, m_s, PREC)
        b_dArb, b_dArk = _intra(b_do, b_u, m_i, PREC), _intra(b_do, b_v, m_i, PREC)
        # decayed operands [BT, K]
        b_dat = tl.dot(b_dAab, b_bt, input_precision=PREC) + tl.dot(b_dAak, b_kt, input_precision=PREC)
        b_drt = tl.dot(b_dArb, b_bt, input_precision=PREC) + tl.dot(b_dArk, b_kt, input_precision=PREC)
        b_dbt = (tl.dot(tl.trans(b_dAab), b_at, input_precision=PREC)
                 + tl.dot(tl.trans(b_dArb), b_rt, input_precision=PREC))
        b_dkt = (tl.dot(tl.trans(b_dAak), b_at, input_precision=PREC)
                 + tl.dot(tl.trans(b_dArk), b_rt, input_precision=PREC))
        b_da0 = tl.dot(b_dx, tl.trans(b_s), input_precision=PREC)
        b_dr0 = tl.dot(b_do, tl.trans(b_s), input_precision=PREC)
        b_dbh = tl.dot(b_u, tl.trans(b_ds), input_precision=PREC)
        b_dkh = tl.dot(b_v, tl.trans(b_ds), input_precision=PREC)
        _store_chunk(dr, (b_drt * e_g + b_dr0 * e_G) * scale, bos, eos, i_h, i_t, 0, H, K, BT, K)
        _store_chunk(da, b_dat * e_ge + b_da0 * e_Ge, bos, eos, i_h, i_t, 0, H, K, BT, K)
        _store_chunk(db, b_dbt * e_ng + b_dbh * e_h, bos, eos, i_h, i_t, 0, H, K, BT, K)
        _store_chunk(dk, b_dkt * e_ng + b_dkh * e_h, bos, eos, i_h, i_t, 0, H, K, BT, K)
        # d(exponent) = operand * d(operand); w enters through G (inclusive) and G - w (exclusive)
        b_dge = b_at * b_dat + b_a0 * b_da0  # [BT, K]
        b_dend = b_bh * b_dbh + b_kh * b_dkh
        b_dg = b_rt * b_drt + b_r0 * b_dr0 + b_dge - b_bt * b_dbt - b_kt * b_dkt - b_dend
        b_dgl = tl.sum(b_dend, axis=0) + tl.sum(e_gl[:, None] * b_s * b_ds, axis=1)  # [K]
        _store_chunk(dw, reverse_cumsum(b_dg) + b_dgl[None, :] - b_dge, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_ds = (tl.dot(tl.trans(b_a0), b_dx, input_precision=PREC)
                + tl.dot(tl.trans(b_r0), b_do, input_precision=PREC) + e_gl[:, None] * b_ds)  # [K, BV]
    if STORE_DH0:
        tl.store(_state_ptr(dh0, i_nh, i_v, K, V, BV), b_ds)


@triton.jit
def wkv7_step_kernel(r, w, k, v, a, b, s, o, s_new, scale, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """One token for one (batch, head) and BV state columns: the recurrence as written."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    b_r = tl.load(r + i_bh * K + o_k).to(tl.float32) * scale  # [K]
    b_w = tl.load(w + i_bh * K + o_k).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k).to(tl.float32)
    b_a = tl.load(a + i_bh * K + o_k).to(tl.float32)
    b_b = tl.load(b + i_bh * K + o_k).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v).to(tl.float32)  # [BV]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(s + p_s)  # [K, BV]
    b_sa = tl.sum(b_a[:, None] * b_s, axis=0)  # [BV] a^T S before the decay
    b_s = tl.exp(b_w)[:, None] * b_s + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
    tl.store(s_new + p_s, b_s)
    tl.store(o + i_bh * V + o_v, tl.sum(b_r[:, None] * b_s, axis=0).to(o.dtype.element_ty))


def _reduce_parts(part: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum the per-value-block partial gradients [NV, ...] and cast to the input dtype."""
    return (part[0] if part.shape[0] == 1 else part.sum(0)).to(dtype)


def _fwd(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, save_states):
    B, T, H, N = r.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    chunk_offsets, n_chunks = chunk_layout(T, n_seq, cu_seqlens, BT)
    BV = block_v(N)
    o = torch.empty_like(v)
    ht = r.new_empty(n_seq, H, N, N, dtype=torch.float32) if output_final_state else None
    hs = r.new_empty(n_chunks, H, N, N, dtype=torch.float32) if save_states else None
    wkv7_fwd_kernel[(N // BV, n_seq * H)](
        r, w, k, v, a, b, o, initial_state, ht, hs, cu_seqlens, chunk_offsets, scale, T,
        H=H, K=N, V=N, BT=BT, LOG2_BT=LOG2_BT, BV=BV, USE_H0=initial_state is not None,
        STORE_HT=output_final_state, STORE_HS=save_states, IS_VARLEN=cu_seqlens is not None,
        PREC=dot_precision(r.dtype),
    )
    return o, ht, hs, chunk_offsets


def _bwd(r, w, k, v, a, b, do, dht, hs, scale, cu_seqlens, chunk_offsets, want_dh0):
    B, T, H, N = r.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BV = block_v(N)
    dr, dw, dk, da, db = (r.new_empty(N // BV, B, T, H, N, dtype=torch.float32) for _ in range(5))
    dv = torch.empty_like(v)
    dh0 = r.new_empty(n_seq, H, N, N, dtype=torch.float32) if want_dh0 else None
    wkv7_bwd_kernel[(N // BV, n_seq * H)](
        r, w, k, v, a, b, do.contiguous(), dht, hs, dr, dw, dk, dv, da, db, dh0, cu_seqlens, chunk_offsets, scale, T, B * T,
        H=H, K=N, V=N, BT=BT, LOG2_BT=LOG2_BT, BV=BV, USE_DHT=dht is not None, STORE_DH0=want_dh0,
        IS_VARLEN=cu_seqlens is not None, PREC=dot_precision(r.dtype),
    )
    dr, dw, dk, da, db = (_reduce_parts(p, x.dtype) for p, x in zip((dr, dw, dk, da, db), (r, w, k, a, b)))
    return dr, dw, dk, dv, da, db, dh0


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, scale, output_final_state, cu_seqlens):
        save = any(ctx.needs_input_grad)
        o, ht, hs, chunk_offsets = _fwd(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, save)
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, hs, cu_seqlens, chunk_offsets)
            ctx.scale, ctx.has_h0 = scale, initial_state is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, hs, cu_seqlens, chunk_offsets = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous()
        grads = _bwd(r, w, k, v, a, b, do, dht, hs, ctx.scale, cu_seqlens, chunk_offsets, ctx.has_h0)
        return (*grads, None, None, None)


def wkv7_triton(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, *, scale: float = 1.0,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked WKV-7. r, w (log decay), k, v, a, b: [B, T, H, N]; initial_state [n, H, K, V] fp32.

    Returns o [B, T, H, V] in the input dtype and, if asked, the final state [n, H, K, V] fp32
    (n = B, or the number of packed sequences when cu_seqlens [n+1] is given with B = 1).
    """
    check_inputs("wkv7_triton", dict(r=r, w=w, k=k, v=v, a=a, b=b), initial_state, cu_seqlens)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=r.device, dtype=torch.int32)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    return _WKV7.apply(r, w, k, v, a, b, initial_state, float(scale), output_final_state, cu_seqlens)


def wkv7_step_triton(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, *, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One recurrent step (generation; forward only). r, w, k, v, a, b: [B, H, N]; state [B, H, K, V] fp32.

    Returns o [B, H, V] in the input dtype and the new state [B, H, K, V] fp32.
    """
    B, H, N = r.shape
    check_inputs("wkv7_step_triton", {n: x[:, None] for n, x in dict(r=r, w=w, k=k, v=v, a=a, b=b).items()},
                 state, None)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    state = state.float().contiguous()
    o, s_new = torch.empty_like(v), torch.empty_like(state)
    BV = block_v(N)
    wkv7_step_kernel[(N // BV, B * H)](r, w, k, v, a, b, state, o, s_new, float(scale), K=N, V=N, BV=BV)
    return o, s_new
