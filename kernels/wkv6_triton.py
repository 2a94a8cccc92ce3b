"""WKV-6 in Triton: chunked forward and backward, and the recurrent single step.

    o_t = S_{t-1}^T (scale r_t) + (scale r_t . (u * k_t)) v_t,   S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T

Inputs [B, T, H, N] (K = V = N), u [H, N]; states [n, H, K, V] fp32. Inside a chunk of BT steps,
with decays measured from a per-chunk reference (kernels/NOTES.md):

    O = Q0 S_0 + (tril_strict(Qt Kt^T) + diag(r . u k)) V,     S_BT = diag(e^{g_BT}) S_0 + Kh^T V.

Same program layout as kernels/wkv7_triton.py: one head and BV state columns per program,
chunks in order forward and in reverse backward from the saved chunk-start states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.wkv_triton_common import (
    block_v, check_inputs, chunk_decays, dot_precision, grad_wanted, intra, load_chunk, partial_grad, reduce_parts,
    reverse_cumsum, seq_bounds, state_ptr, store_chunk, store_output, walk_end, walk_start,
)
from kernels.wkv_triton_ops import wkv_op
from kernels.wkv_triton_walk import walk_backward, walk_forward

BT = 16
FWD_WARPS, BWD_WARPS = 4, 8  # the backward holds twice the live tiles: 8 warps spill less (NOTES.md)
# a forward no backward follows, as in kernels/wkv7_triton.py: 32-token chunks measured 1.19x to 1.30x
# faster than 16 at the four benchmark shapes (H200, kernels/NOTES.md v3.9)
INFER_BT, INFER_WARPS = 32, 4
# chunk factors reach e^{|g_BT| / 2} (kernels/NOTES.md): with |w| <= 5, e^80 at 32 rows (fp32 holds e^88),
# e^160 at 64
MAX_BT = 32


@triton.jit
def wkv6_fwd_kernel(
    r, k, v, w, u, o, h0, ht, hs, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr, TRANSITION: tl.constexpr,
    STORE_O: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Walk the chunks in order carrying S [K, BV]; STORE_HS keeps each chunk-start state for the
    backward. TRANSITION (segments): as in wkv7_fwd_kernel, ht [n, H, K, V + K] gets [D | M], and
    with STORE_O, o [*, H, V + K] fp32 gets the segment-local outputs and Q."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]  # [BT, BT] i < t
    NV: tl.constexpr = V // BV
    b_u = tl.load(u + i_h * K + tl.arange(0, K)).to(tl.float32)  # [K]
    b_s, v_on = walk_start(h0, i_nh, i_v, K, V, BV, USE_H0, TRANSITION)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        if STORE_HS:
            tl.store(state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV), b_s)
        b_r = load_chunk(r, bos, eos, i_h, i_t, 0, H, K, BT, K) * scale  # [BT, K]
        b_k = load_chunk(k, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_w = load_chunk(w, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_v = load_chunk(v, bos, eos, i_h, i_t, i_v % NV, H, V, BT, BV) * v_on  # [BT, BV]
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = chunk_decays(b_w)
        if STORE_O:
            b_bonus = tl.sum(b_r * b_u[None, :] * b_k, axis=1)  # [BT]
            b_A = (intra(b_r * e_ge, b_k * e_ng, m_s, PREC)
                   + tl.where(o_t[:, None] == o_t[None, :], b_bonus[:, None], 0.0))
            b_o = tl.dot(b_r * e_Ge, b_s, input_precision=PREC) + tl.dot(b_A, b_v, input_precision=PREC)  # [BT, BV]
            store_output(o, b_o, bos, eos, i_h, i_t, i_v, H, K, V, BT, BV, TRANSITION)
        b_s = e_gl[:, None] * b_s + tl.dot(tl.trans(b_k * e_h), b_v, input_precision=PREC)  # [K, BV]
    walk_end(ht, b_s, i_nh, i_v, K, V, BV, STORE_HT, TRANSITION)


@triton.jit
def wkv6_bwd_kernel(
    r, k, v, w, u, do, dht, hs, dr, dk, dv, dw, du, dh0, cu_seqlens, chunk_offsets, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse walk over the chunks carrying dS [K, BV]. dr, dk, dw are this program's partial sums
    over its BV value columns (slice i_v of [NV, NTOK, H, K]); du is its partial [NV, n, H, K]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    part = i_v.to(tl.int64) * NTOK * H * K
    dr, dk, dw = dr + part, dk + part, dw + part
    o_t = tl.arange(0, BT)
    m_s = o_t[:, None] > o_t[None, :]
    m_d = o_t[:, None] == o_t[None, :]
    b_u = tl.load(u + i_h * K + tl.arange(0, K)).to(tl.float32)  # [K]
    b_du = tl.zeros([K], dtype=tl.float32)
    b_ds, _ = walk_start(dht, i_nh, i_v, K, V, BV, USE_DHT, False)  # dS at the end: dht or zeros
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        b_s = tl.load(state_ptr(hs, (c0 + i_t) * H + i_h, i_v, K, V, BV))  # [K, BV] state at chunk start
        b_r = load_chunk(r, bos, eos, i_h, i_t, 0, H, K, BT, K) * scale  # [BT, K]
        b_k = load_chunk(k, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_w = load_chunk(w, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_v = load_chunk(v, bos, eos, i_h, i_t, i_v, H, V, BT, BV)  # [BT, BV]
        b_do = load_chunk(do, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = chunk_decays(b_w)
        b_qt, b_kt, b_q0, b_kh = b_r * e_ge, b_k * e_ng, b_r * e_Ge, b_k * e_h  # [BT, K]
        b_bonus = tl.sum(b_r * b_u[None, :] * b_k, axis=1)  # [BT]
        b_A = intra(b_qt, b_kt, m_s, PREC) + tl.where(m_d, b_bonus[:, None], 0.0)  # [BT, BT]
        b_dv = tl.dot(tl.trans(b_A), b_do, input_precision=PREC) + tl.dot(b_kh, b_ds, input_precision=PREC)
        store_chunk(dv, b_dv, bos, eos, i_h, i_t, i_v, H, V, BT, BV)
        b_dA = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BT, BT]
        b_dbonus = tl.sum(tl.where(m_d, b_dA, 0.0), axis=1)  # [BT]
        b_dA = tl.where(m_s, b_dA, 0.0)
        b_dqt = tl.dot(b_dA, b_kt, input_precision=PREC)  # [BT, K]
        b_dkt = tl.dot(tl.trans(b_dA), b_qt, input_precision=PREC)
        b_dq0 = tl.dot(b_do, tl.trans(b_s), input_precision=PREC)
        b_dkh = tl.dot(b_v, tl.trans(b_ds), input_precision=PREC)
        b_rk = b_dbonus[:, None] * b_r * b_k
        b_du += tl.sum(b_rk, axis=0)
        store_chunk(dr, (b_dqt * e_ge + b_dq0 * e_Ge + b_dbonus[:, None] * b_u[None, :] * b_k) * scale,
                    bos, eos, i_h, i_t, 0, H, K, BT, K)
        store_chunk(dk, b_dkt * e_ng + b_dkh * e_h + b_dbonus[:, None] * b_u[None, :] * b_r,
                    bos, eos, i_h, i_t, 0, H, K, BT, K)
        # d(exponent) = operand * d(operand); w enters through G (inclusive) and G - w (exclusive)
        b_dge = b_qt * b_dqt + b_q0 * b_dq0  # [BT, K]
        b_dend = b_kh * b_dkh
        b_dg = b_dge - b_kt * b_dkt - b_dend
        b_dgl = tl.sum(b_dend, axis=0) + tl.sum(e_gl[:, None] * b_s * b_ds, axis=1)  # [K]
        store_chunk(dw, reverse_cumsum(b_dg) + b_dgl[None, :] - b_dge, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_ds = tl.dot(tl.trans(b_q0), b_do, input_precision=PREC) + e_gl[:, None] * b_ds  # [K, BV]
    tl.store(du + (i_v.to(tl.int64) * tl.num_programs(1) + i_nh) * K + tl.arange(0, K), b_du)
    if STORE_DH0:
        tl.store(state_ptr(dh0, i_nh, i_v, K, V, BV), b_ds)


@triton.jit
def wkv6_bwd_state_kernel(
    r, w, do, ds0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dS at the start of each segment when its end has none: dS <- Q0^T dO + e^{g_BT} dS."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, c0 = seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, True)
    b_ds = tl.zeros([K, BV], dtype=tl.float32)
    NT = tl.cdiv(eos - bos, BT)
    for j in range(NT):
        i_t = NT - 1 - j
        b_r = load_chunk(r, bos, eos, i_h, i_t, 0, H, K, BT, K) * scale  # [BT, K]
        b_w = load_chunk(w, bos, eos, i_h, i_t, 0, H, K, BT, K)
        b_do = load_chunk(do, bos, eos, i_h, i_t, i_v, H, V, BT, BV)  # [BT, BV]
        e_gl, e_g, e_ge, e_ng, e_G, e_Ge, e_h = chunk_decays(b_w)
        b_ds = tl.dot(tl.trans(b_r * e_Ge), b_do, input_precision=PREC) + e_gl[:, None] * b_ds
    tl.store(state_ptr(ds0, i_nh, i_v, K, V, BV), b_ds)


@triton.jit
def wkv6_step_kernel(r, k, v, w, u, s, o, s_new, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BV: tl.constexpr):
    """One token for one (batch, head) and BV state columns: the recurrence as written."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    b_r = tl.load(r + i_bh * K + o_k).to(tl.float32) * scale  # [K]
    b_k = tl.load(k + i_bh * K + o_k).to(tl.float32)
    b_w = tl.load(w + i_bh * K + o_k).to(tl.float32)
    b_u = tl.load(u + (i_bh % H) * K + o_k).to(tl.float32)
    b_v = tl.load(v + i_bh * V + o_v).to(tl.float32)  # [BV]
    b_s = tl.load(state_ptr(s, i_bh, i_v, K, V, BV))  # [K, BV]
    b_o = tl.sum(b_r[:, None] * b_s, axis=0) + tl.sum(b_r * b_u * b_k) * b_v  # [BV]
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty))
    b_s = tl.exp(b_w)[:, None] * b_s + b_k[:, None] * b_v[None, :]
    tl.store(state_ptr(s_new, i_bh, i_v, K, V, BV), b_s)


def _fwd(r, k, v, w, u, scale, initial_state, output_final_state, cu_seqlens, save):
    N = r.shape[-1]
    bt, warps = (BT, FWD_WARPS) if save else (INFER_BT, INFER_WARPS)
    if bt > MAX_BT:
        raise ValueError(f"wkv6_triton: chunk length {bt} overflows fp32 at log w = -5; valid: <= {MAX_BT}")

    def launch(o, h0, ht, hs, cu, chunk_offsets, grid, transition):
        wkv6_fwd_kernel[grid](
            r, k, v, w, u, o, h0, ht, hs, cu, chunk_offsets, scale, r.shape[1],
            H=r.shape[2], K=N, V=N, BT=bt, BV=block_v(N), USE_H0=h0 is not None, STORE_HT=ht is not None,
            STORE_HS=hs is not None, TRANSITION=transition, STORE_O=o is not None, IS_VARLEN=cu is not None,
            PREC=dot_precision(r.dtype), num_warps=warps,
        )

    return walk_forward(launch, v, initial_state, output_final_state, cu_seqlens, save, bt)


def _bwd(r, k, v, w, u, do, dht, saved, scale, cu_seqlens, want_dh0):
    B, T, H, N = r.shape
    NV = N // block_v(N)
    do = do.contiguous()
    dr, dk, dw = (partial_grad(x, NV) for x in (r, k, w))
    dv = torch.empty_like(v)
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    rows = n_seq if saved.seg is None else saved.seg.n  # what the backward kernel walks: sequences or segments
    du = r.new_empty(NV, rows, H, N, dtype=torch.float32)  # partial bonus gradients per walked row
    shape = dict(H=H, K=N, V=N, BT=BT, BV=block_v(N), PREC=dot_precision(r.dtype))

    def launch(dht, dh0, cu, chunk_offsets, grid):
        wkv6_bwd_kernel[grid](
            r, k, v, w, u, do, dht, saved.hs, dr, dk, dv, dw, du, dh0, cu, chunk_offsets, scale, T, B * T,
            USE_DHT=dht is not None, STORE_DH0=dh0 is not None, IS_VARLEN=cu is not None, num_warps=BWD_WARPS,
            **shape,
        )

    def state_walk(ds_start, cu, chunk_offsets, grid):
        wkv6_bwd_state_kernel[grid](r, w, do, ds_start, cu, chunk_offsets, scale, T, num_warps=FWD_WARPS, **shape)

    dh0 = walk_backward(launch, state_walk, r, dht, saved, cu_seqlens, want_dh0)
    dr, dk, dw = (reduce_parts(p, x.dtype) for p, x in zip((dr, dk, dw), (r, k, w)))
    return dr, dk, dv, dw, du.sum((0, 1)).to(u.dtype), dh0


# A torch.library custom op: torch.compile keeps it in the graph (kernels/wkv_triton_ops.py)
_wkv6 = wkv_op("wkv6", ("r", "k", "v", "w", "u"), _fwd, _bwd, BT)


def _check_u(name: str, u: Tensor, H: int, N: int) -> None:
    if tuple(u.shape) != (H, N):
        raise ValueError(f"{name}: u has shape {tuple(u.shape)}, expected (H, N) = {(H, N)}")


def wkv6_triton(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, *, scale: float = 1.0,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked WKV-6. r, k, v, w (log decay): [B, T, H, N]; u [H, N]; initial_state [n, H, K, V] fp32.

    Returns o [B, T, H, V] in the input dtype and, if asked, the final state [n, H, K, V] fp32
    (n = B, or the number of packed sequences when cu_seqlens [n+1] is given with B = 1).
    """
    _, _, H, N, _ = check_inputs("wkv6_triton", dict(r=r, k=k, v=v, w=w), initial_state, cu_seqlens)
    _check_u("wkv6_triton", u, H, N)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=r.device, dtype=torch.int32)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
    save = grad_wanted(r, k, v, w, u, initial_state)
    return _wkv6(r, k, v, w, u, initial_state, cu_seqlens, float(scale), output_final_state, save)


def wkv6_step_triton(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, *, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One recurrent step (generation; forward only). r, k, v, w: [B, H, N]; u [H, N]; state [B, H, K, V] fp32.

    Returns o [B, H, V] in the input dtype and the new state [B, H, K, V] fp32.
    """
    B, H, N = r.shape
    check_inputs("wkv6_step_triton", {n: x[:, None] for n, x in dict(r=r, k=k, v=v, w=w).items()}, state, None)
    _check_u("wkv6_step_triton", u, H, N)
    r, k, v, w, u = (x.contiguous() for x in (r, k, v, w, u))
    state = state.float().contiguous()
    o, s_new = torch.empty_like(v), torch.empty_like(state)
    BV = block_v(N)
    wkv6_step_kernel[(N // BV, B * H)](r, k, v, w, u, state, o, s_new, float(scale), H=H, K=N, V=N, BV=BV)
    return o, s_new
