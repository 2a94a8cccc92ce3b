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
    block_v, check_inputs, chunk_decays, chunk_decays_ref, dot_precision, grad_wanted, intra, inverse_precision,
    load_chunk, load_chunk_raw, partial_grad, reduce_parts, reverse_cumsum, seq_bounds, state_ptr, store_chunk,
    store_output, unit_tril_inverse, walk_end, walk_start,
)
from kernels.wkv_triton_ops import wkv_op
from kernels.wkv_triton_walk import walk_backward, walk_forward

BT = 16
FWD_WARPS, BWD_WARPS = 4, 8  # the backward holds twice the live tiles: 8 warps spill less (NOTES.md)
# A forward that no backward follows (inference, evaluation) keeps no chunk-start states, so its chunk
# length need not match the backward's
INFER_BT, INFER_WARPS = 16, 4


@triton.jit
def _load_rwkab_raw(r, w, k, a, b, bos, eos, i_h, i_t, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """The K-side operands of chunk i_t as stored, [BT, K]: r, w, k, a, b."""
    return (load_chunk_raw(r, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(w, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(k, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(a, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(b, bos, eos, i_h, i_t, 0, H, K, BT, K))


@triton.jit
def _rwkab_f32(n_r, n_w, n_k, n_a, n_b, scale):
    """fp32 operands from stored ones: scale r, w, k, a, b."""
    return n_r.to(tl.float32) * scale, n_w.to(tl.float32), n_k.to(tl.float32), n_a.to(tl.float32), n_b.to(tl.float32)


@triton.jit
def _load_rwkab(r, w, k, a, b, bos, eos, i_h, i_t, scale, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """The K-side operands of chunk i_t, fp32 [BT, K]: scale r, w, k, a, b."""
    n_r, n_w, n_k, n_a, n_b = _load_rwkab_raw(r, w, k, a, b, bos, eos, i_h, i_t, H, K, BT)
    return _rwkab_f32(n_r, n_w, n_k, n_a, n_b, scale)


@triton.jit
def wkv7_fwd_kernel(
    r, w, k, v, a, b, o, h0, ht, hs, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr,
    TRANSITION: tl.constexpr, STORE_O: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
    INV_PREC: tl.constexpr,
):
    """Walk the chunks in order carrying S [K, BV]; STORE_HS keeps each chunk-start state for the
    backward. TRANSITION (segments): programs i_v >= V / BV carry identity columns with v = 0, so
    ht [n, H, K, V + K] receives [D | M] of S_end = M S_start + D (the V-columns start from zero);
    with STORE_O their outputs go to o [*, H, V + K] fp32: the segment-local outputs and Q, with
    o = local + Q S_start (kernels/wkv_triton_walk.py)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]  # [BT, BT] i < t
    m_i = o_t[:, None] >= o_t[None, :]  # i <= t
    NV: tl.constexpr = V // BV
    b_s, v_on = walk_start(h0, i_nh, i_v, K, V, BV, USE_H0, TRANSITION)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        if STORE_HS:
            tl.store(state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV), b_s)
        b_r, b_w, b_k, b_a, b_b = _load_rwkab(r, w, k, a, b, bos, eos, i_h, i_t, scale, H, K, BT)  # [BT, K]
        if TRANSITION:
            b_v = load_chunk(v, bos, eos, i_h, i_t, i_v % NV, H, V, BT, BV) * v_on  # [BT, BV]
        else:
            b_v = load_chunk(v, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        e_gl, e_ref, e_g, e_ge, e_ng = chunk_decays_ref(b_w)
        b_rt, b_at, b_bt, b_kt = b_r * e_g, b_a * e_ge, b_b * e_ng, b_k * e_ng  # [BT, K]
        b_Aab, b_Aak = intra(b_at, b_bt, m_s, PREC), intra(b_at, b_kt, m_s, PREC)  # [BT, BT]
        b_Ti = unit_tril_inverse(b_Aab, BT, LOG2_BT, INV_PREC)
        b_x = tl.dot(b_at * e_ref, b_s, input_precision=PREC) + tl.dot(b_Aak, b_v, input_precision=PREC)
        b_u = tl.dot(b_Ti, b_x, input_precision=PREC)  # [BT, BV] rows u_t = S_{t-1}^T a_t
        if STORE_O:
            b_o = (tl.dot(b_rt * e_ref, b_s, input_precision=PREC)
                   + tl.dot(intra(b_rt, b_bt, m_i, PREC), b_u, input_precision=PREC)
                   + tl.dot(intra(b_rt, b_kt, m_i, PREC), b_v, input_precision=PREC))  # [BT, BV]
            store_output(o, b_o, bos, eos, i_h, i_t, i_v, H, K, V, BT, BV, TRANSITION)
        b_s = (e_gl[:, None] * b_s + tl.dot(tl.trans(b_bt * e_ref), b_u, input_precision=PREC)
               + tl.dot(tl.trans(b_kt * e_ref), b_v, input_precision=PREC))  # [K, BV]
    walk_end(ht, b_s, i_nh, i_v, K, V, BV, STORE_HT, TRANSITION)


@triton.jit
def wkv7_bwd_kernel(
    r, w, k, v, a, b, do, dht, hs, dr, dw, dk, dv, da, db, dh0, cu_seqlens, chunk_offsets, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr,
    BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """Reverse walk over the chunks carrying dS [K, BV], from the state saved at each chunk start.
    dr, dw, dk, da, db are this program's partial sums over its BV value columns, written to slice
    i_v of [NV, NTOK, H, K]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    part = i_v.to(tl.int64) * NTOK * H * K
    dr, dw, dk, da, db = dr + part, dw + part, dk + part, da + part, db + part
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]
    m_i = o_t[:, None] >= o_t[None, :]
    b_ds, _ = walk_start(dht, i_nh, i_v, K, V, BV, USE_DHT, False)  # dS at the end: dht or zeros
    NT = tl.cdiv(eos - bos, BT)
    # the chunk before is loaded while this one computes: loaded at the top of its own iteration, every chunk
    # waited a memory round trip on two warps per scheduler (H100: 3.17 -> 2.55 ms at (8, 4096, 16, 64)). The
    # forward, at 231 registers, spilled with the same prefetch and lost (1.16 -> 1.27 ms); prefetching the
    # saved state here as well lost too (2.68 ms)
    i_p = tl.maximum(NT - 1, 0)  # an empty sequence: chunk 0, every row masked
    n_r, n_w, n_k, n_a, n_b = _load_rwkab_raw(r, w, k, a, b, bos, eos, i_h, i_p, H, K, BT)
    n_v = load_chunk_raw(v, bos, eos, i_h, i_p, i_v, H, V, BT, BV)
    n_do = load_chunk_raw(do, bos, eos, i_h, i_p, i_v, H, V, BT, BV)
    for j in range(NT):
        i_t = NT - 1 - j
        b_s = tl.load(state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV))  # [K, BV] state at chunk start
        b_r, b_w, b_k, b_a, b_b = _rwkab_f32(n_r, n_w, n_k, n_a, n_b, scale)  # [BT, K]
        b_v, b_do = n_v.to(tl.float32), n_do.to(tl.float32)  # [BT, BV]
        i_p = tl.maximum(i_t - 1, 0)  # past the first chunk: chunk 0 again (rows before bos are not masked)
        n_r, n_w, n_k, n_a, n_b = _load_rwkab_raw(r, w, k, a, b, bos, eos, i_h, i_p, H, K, BT)
        n_v = load_chunk_raw(v, bos, eos, i_h, i_p, i_v, H, V, BT, BV)
        n_do = load_chunk_raw(do, bos, eos, i_h, i_p, i_v, H, V, BT, BV)
        # the chunk-start and chunk-end copies of the operands (r0 = rt e^{ref}, a0, bh, kh likewise) are
        # formed where used, not kept: 4 fewer live tiles (local sm_90 report: 320 -> 208 B spilled)
        e_gl, e_ref, e_g, e_ge, e_ng = chunk_decays_ref(b_w)
        b_rt, b_at, b_bt, b_kt = b_r * e_g, b_a * e_ge, b_b * e_ng, b_k * e_ng  # [BT, K]
        b_Aab, b_Aak = intra(b_at, b_bt, m_s, PREC), intra(b_at, b_kt, m_s, PREC)  # [BT, BT]
        b_Arb, b_Ark = intra(b_rt, b_bt, m_i, PREC), intra(b_rt, b_kt, m_i, PREC)
        b_Ti = unit_tril_inverse(b_Aab, BT, LOG2_BT, INV_PREC)
        b_u = tl.dot(b_Ti, tl.dot(b_at * e_ref, b_s, input_precision=PREC) + tl.dot(b_Aak, b_v, input_precision=PREC),
                     input_precision=PREC)  # [BT, BV]
        # value side: U feeds O and S_BT; X = (I - A_ab) U
        b_du = (tl.dot(tl.trans(b_Arb), b_do, input_precision=PREC)
                + tl.dot(b_bt * e_ref, b_ds, input_precision=PREC))
        b_dx = tl.dot(tl.trans(b_Ti), b_du, input_precision=PREC)  # [BT, BV]
        b_dv = (tl.dot(tl.trans(b_Aak), b_dx, input_precision=PREC)
                + tl.dot(tl.trans(b_Ark), b_do, input_precision=PREC)
                + tl.dot(b_kt * e_ref, b_ds, input_precision=PREC))
        store_chunk(dv, b_dv, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        # intra-chunk matrices [BT, BT]
        b_dAab, b_dAak = intra(b_dx, b_u, m_s, PREC), intra(b_dx, b_v, m_s, PREC)
        b_dArb, b_dArk = intra(b_do, b_u, m_i, PREC), intra(b_do, b_v, m_i, PREC)
        # gradients of rt, at, bt, kt [BT, K], the gradients of their copies times e^{ref} folded in
        b_gr = (tl.dot(b_dArb, b_bt, input_precision=PREC) + tl.dot(b_dArk, b_kt, input_precision=PREC)
                + tl.dot(b_do, tl.trans(b_s), input_precision=PREC) * e_ref)
        b_ga = (tl.dot(b_dAab, b_bt, input_precision=PREC) + tl.dot(b_dAak, b_kt, input_precision=PREC)
                + tl.dot(b_dx, tl.trans(b_s), input_precision=PREC) * e_ref)
        b_dbh = tl.dot(b_u, tl.trans(b_ds), input_precision=PREC)
        b_dkh = tl.dot(b_v, tl.trans(b_ds), input_precision=PREC)
        b_gb = (tl.dot(tl.trans(b_dAab), b_at, input_precision=PREC)
                + tl.dot(tl.trans(b_dArb), b_rt, input_precision=PREC) + b_dbh * e_ref)
        b_gk = (tl.dot(tl.trans(b_dAak), b_at, input_precision=PREC)
                + tl.dot(tl.trans(b_dArk), b_rt, input_precision=PREC) + b_dkh * e_ref)
        store_chunk(dr, b_gr * e_g * scale, bos, eos, i_h, i_t, 0, H, K, BT, K)
        store_chunk(da, b_ga * e_ge, bos, eos, i_h, i_t, 0, H, K, BT, K)
        store_chunk(db, b_gb * e_ng, bos, eos, i_h, i_t, 0, H, K, BT, K)
        store_chunk(dk, b_gk * e_ng, bos, eos, i_h, i_t, 0, H, K, BT, K)
        # d(exponent) = operand * d(operand); w enters through G (inclusive) and G - w (exclusive), and
        # through G_BT via bh, kh and e^{g_BT} S
        b_dge = b_at * b_ga  # [BT, K]
        b_dgl = (tl.sum((b_bt * b_dbh + b_kt * b_dkh) * e_ref, axis=0)
                 + tl.sum(e_gl[:, None] * b_s * b_ds, axis=1))  # [K]
        b_dg = b_rt * b_gr + b_dge - b_bt * b_gb - b_kt * b_gk
        store_chunk(dw, reverse_cumsum(b_dg) + b_dgl[None, :] - b_dge, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_ds = (tl.dot(tl.trans(b_at * e_ref), b_dx, input_precision=PREC)
                + tl.dot(tl.trans(b_rt * e_ref), b_do, input_precision=PREC) + e_gl[:, None] * b_ds)  # [K, BV]
    if STORE_DH0:
        tl.store(state_ptr(dh0, i_nh, i_v, K, V, BV), b_ds)


@triton.jit
def _load_state_walk_raw(r, w, a, b, do, bos, eos, i_h, i_t, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BV: tl.constexpr):
    """What the dS-only walk reads of chunk i_t, as stored: r, w, a, b [BT, K] and do [BT, BV]."""
    return (load_chunk_raw(r, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(w, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(a, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(b, bos, eos, i_h, i_t, 0, H, K, BT, K),
            load_chunk_raw(do, bos, eos, i_h, i_t, i_v, H, V, BT, BV))


@triton.jit
def wkv7_bwd_state_kernel(
    r, w, a, b, do, ds0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """dS at the start of each segment when its end has none (the backward's state walk alone):
    dU = A_rb^T dO + Bh dS, dX = (I - A_ab)^{-T} dU, dS <- A0^T dX + R0^T dO + e^{g_BT} dS."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, True)
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]
    m_i = o_t[:, None] >= o_t[None, :]
    b_ds = tl.zeros([K, BV], dtype=tl.float32)
    NT = tl.cdiv(eos - bos, BT)
    i_p = tl.maximum(NT - 1, 0)  # prefetch as in wkv7_bwd_kernel (H100: 1.17 -> 1.10 ms at (1, 65536, 16, 64))
    n_r, n_w, n_a, n_b, n_do = _load_state_walk_raw(r, w, a, b, do, bos, eos, i_h, i_p, i_v, H, K, V, BT, BV)
    for j in range(NT):
        i_t = NT - 1 - j
        b_r, b_w = n_r.to(tl.float32) * scale, n_w.to(tl.float32)  # [BT, K]; k is not needed here
        b_a, b_b, b_do = n_a.to(tl.float32), n_b.to(tl.float32), n_do.to(tl.float32)  # b_do [BT, BV]
        i_p = tl.maximum(i_t - 1, 0)
        n_r, n_w, n_a, n_b, n_do = _load_state_walk_raw(r, w, a, b, do, bos, eos, i_h, i_p, i_v, H, K, V, BT, BV)
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = chunk_decays(b_w)
        b_bt = b_b * e_ng
        b_Ti = unit_tril_inverse(intra(b_a * e_ge, b_bt, m_s, PREC), BT, LOG2_BT, INV_PREC)
        b_Arb = intra(b_r * e_g, b_bt, m_i, PREC)
        b_du = tl.dot(tl.trans(b_Arb), b_do, input_precision=PREC) + tl.dot(b_b * e_h, b_ds, input_precision=PREC)
        b_dx = tl.dot(tl.trans(b_Ti), b_du, input_precision=PREC)
        b_ds = (tl.dot(tl.trans(b_a * e_Ge), b_dx, input_precision=PREC)
                + tl.dot(tl.trans(b_r * e_G), b_do, input_precision=PREC) + e_gl[:, None] * b_ds)
    tl.store(state_ptr(ds0, i_nh, i_v, K, V, BV), b_ds)


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
    b_s = tl.load(state_ptr(s, i_bh, i_v, K, V, BV))  # [K, BV]
    b_sa = tl.sum(b_a[:, None] * b_s, axis=0)  # [BV] a^T S before the decay
    b_s = tl.exp(b_w)[:, None] * b_s + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
    tl.store(state_ptr(s_new, i_bh, i_v, K, V, BV), b_s)
    tl.store(o + i_bh * V + o_v, tl.sum(b_r[:, None] * b_s, axis=0).to(o.dtype.element_ty))


def _fwd(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens, save):
    _, T, H, N = r.shape
    bt, warps = (BT, FWD_WARPS) if save else (INFER_BT, INFER_WARPS)

    def launch(o, h0, ht, hs, cu, chunk_offsets, grid, transition):
        wkv7_fwd_kernel[grid](
            r, w, k, v, a, b, o, h0, ht, hs, cu, chunk_offsets, scale, T, H=H, K=N, V=N, BT=bt,
            LOG2_BT=bt.bit_length() - 1, BV=block_v(N), USE_H0=h0 is not None, STORE_HT=ht is not None,
            STORE_HS=hs is not None, TRANSITION=transition, STORE_O=o is not None, IS_VARLEN=cu is not None,
            PREC=dot_precision(r.dtype), INV_PREC=inverse_precision(r.dtype), num_warps=warps,
        )

    return walk_forward(launch, v, initial_state, output_final_state, cu_seqlens, save, bt)


def _bwd(r, w, k, v, a, b, do, dht, saved, scale, cu_seqlens, want_dh0):
    B, T, H, N = r.shape
    do = do.contiguous()
    dr, dw, dk, da, db = (partial_grad(x, N // block_v(N)) for x in (r, w, k, a, b))
    dv = torch.empty_like(v)
    shape = dict(H=H, K=N, V=N, BT=BT, LOG2_BT=BT.bit_length() - 1, BV=block_v(N), PREC=dot_precision(r.dtype),
                 INV_PREC=inverse_precision(r.dtype))

    def launch(dht, dh0, cu, chunk_offsets, grid):
        wkv7_bwd_kernel[grid](
            r, w, k, v, a, b, do, dht, saved.hs, dr, dw, dk, dv, da, db, dh0, cu, chunk_offsets, scale, T, B * T,
            USE_DHT=dht is not None, STORE_DH0=dh0 is not None, IS_VARLEN=cu is not None, num_warps=BWD_WARPS,
            **shape,
        )

    def state_walk(ds_start, cu, chunk_offsets, grid):
        wkv7_bwd_state_kernel[grid](r, w, a, b, do, ds_start, cu, chunk_offsets, scale, T, num_warps=FWD_WARPS,
                                    **shape)

    dh0 = walk_backward(launch, state_walk, r, dht, saved, cu_seqlens, want_dh0)
    dr, dw, dk, da, db = (reduce_parts(p, x.dtype) for p, x in zip((dr, dw, dk, da, db), (r, w, k, a, b)))
    return dr, dw, dk, dv, da, db, dh0


# A torch.library custom op: torch.compile keeps it in the graph (kernels/wkv_triton_ops.py)
_wkv7 = wkv_op("wkv7", ("r", "w", "k", "v", "a", "b"), _fwd, _bwd, BT)


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
    save = grad_wanted(r, w, k, v, a, b, initial_state)
    return _wkv7(r, w, k, v, a, b, initial_state, cu_seqlens, float(scale), output_final_state, save)


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
