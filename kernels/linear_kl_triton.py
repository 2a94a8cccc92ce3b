"""Linear-KL on the GPU: Triton passes over vocabulary blocks, an online softmax for both models.

Legend: N tokens, C_t / C_s the widths, V vocabulary. A program owns BLOCK_N tokens and one vocabulary
split of SPLIT_V entries, which it walks in BLOCK_V blocks; each block's logits [BLOCK_N, BLOCK_V] of
both models are fp32 accumulations of bf16 (or fp32) dots over C and stay on chip. Splits keep every SM
busy at any N and need no atomics: each writes its own partial statistics, combined in torch ([splits, N]).

Passes (the math and the FLOP count: kernels/NOTES_linear_kl.md):
1. `_stats_kernel`: per (token, split) each model's running max, exp-sums at 1/tau (and at 1 when
   tau != 1), argmax and label logit, and the divergence's cross term (forward, reverse).
2. `_jsd_kernel` (kind "jsd" only): KL(p_t || m) and KL(p_s || m) per (token, split), which need the
   final log-sum-exps of pass 1.
3. `_dz_kernel` (gradients wanted): dz = d(loss)/d(student logits) for a chunk of tokens into a
   [chunk, V] buffer in the student's matmul dtype; then cuBLAS: dh_s = dz W_s, dW_s += dz^T h_s.
   Fusing those two products here would need a [BLOCK_N, C] and a [BLOCK_V, C] fp32 accumulator per
   program, reduced across programs: at C = 896 that is far beyond the registers, and fp32 atomics into
   dh_s / dW_s from every (token tile, vocab block) pair would be ~3e10 contended adds per 16k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.linear_kl_torch import accumulate_dtype, addmm_acc
from kernels.wkv_triton_common import dot_precision

KIND_CODES = {"forward": 0, "reverse": 1, "jsd": 2}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
N_STATS = 9  # per (token, split) of pass 1: m, s, s1, label logit of each model, then the cross term


@dataclass(frozen=True)
class Blocks:
    """Launch shape: tiles of n tokens x v vocabulary entries, c channels per dot step, split_v
    vocabulary entries per program (a multiple of v), group_n token tiles walking a split together."""

    n: int = 128
    v: int = 128
    c: int = 64
    split_v: int = 2048
    group_n: int = 16
    warps: int = 8
    stages: int = 3


# H100/H200: two [128, 128] fp32 logit tiles are 128 registers a thread at 8 warps, like one 128x256
# GEMM tile; 3 stages of the four bf16 operand tiles take 96 KB of shared memory (one K-loop per model).
GPU_BLOCKS = Blocks()
SMALL_SMEM_BLOCKS = Blocks(stages=2)  # GPUs with ~100 KB of shared memory per SM (sm_86, sm_89)
INTERPRETER_BLOCKS = Blocks(n=16, v=32, c=16, split_v=64, group_n=2, warps=4, stages=1)
DZ_BUDGET_BYTES = 1 << 30  # the dz buffer of pass 3: this many bytes of [chunk, V] at most


def blocks_for(device: torch.device) -> Blocks:
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    major, minor = torch.cuda.get_device_capability(device)
    return GPU_BLOCKS if major >= 9 or (major, minor) == (8, 0) else SMALL_SMEM_BLOCKS


@triton.jit
def _program_tile(N, n_splits, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(token tile, vocabulary split) of this program. GROUP_N neighbouring token tiles take each split
    together, so a W block is read from HBM once per group and their h tiles stay in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_N * n_splits
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP_N)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _logits(H, W, offs_n, offs_v, N, V, C, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, DOT: tl.constexpr, WIDEN: tl.constexpr):
    """x [BLOCK_N, BLOCK_V] = H[offs_n] W[offs_v]^T, fp32; H [N, C] and W [V, C] row-major.
    Rows past N and columns past V come out 0. WIDEN: dot fp32 copies of the operands (see `_widen`)."""
    p_h = H + offs_n.to(tl.int64)[:, None] * C  # [BN, 1]
    p_w = W + offs_v.to(tl.int64)[None, :] * C  # [1, BV]
    m_h = (offs_n < N)[:, None]
    m_w = (offs_v < V)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        if EVEN_C:
            b_h = tl.load(p_h + offs_c[None, :], mask=m_h, other=0.0)  # [BN, BC]
            b_w = tl.load(p_w + offs_c[:, None], mask=m_w, other=0.0)  # [BC, BV]
        else:
            b_h = tl.load(p_h + offs_c[None, :], mask=m_h & (offs_c < C)[None, :], other=0.0)
            b_w = tl.load(p_w + offs_c[:, None], mask=m_w & (offs_c < C)[:, None], other=0.0)
        if WIDEN:
            b_h, b_w = b_h.to(tl.float32), b_w.to(tl.float32)
        acc = tl.dot(b_h, b_w, acc, input_precision=DOT)
    return acc


@triton.jit
def _both_logits(HT, WT, HS, WS, offs_n, offs_v, N, V, CT, CS, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_CT: tl.constexpr,
                 EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    x_t = _logits(HT, WT, offs_n, offs_v, N, V, CT, BLOCK_N, BLOCK_V, BLOCK_C, EVEN_CT, DOT_T, WIDEN)
    x_s = _logits(HS, WS, offs_n, offs_v, N, V, CS, BLOCK_N, BLOCK_V, BLOCK_C, EVEN_CS, DOT_S, WIDEN)
    return x_t, x_s


@triton.jit
def _online(x, col_ok, v0, m, s, s1, arg, inv_tau, TWO_TEMPS: tl.constexpr):
    """Fold one block of raw logits x [BN, BV] into the running max m, exp-sums s (at 1/tau) and s1
    (at 1, when TWO_TEMPS) and argmax. Returns them, e = exp((x - m)/tau) [BN, BV] (0 past V) and the
    factor alpha [BN] that rescales sums taken against the previous max."""
    xm = tl.where(col_ok[None, :], x, float("-inf"))
    blk_max, blk_arg = tl.max(xm, axis=1, return_indices=True)
    m_new = tl.maximum(m, blk_max)
    arg = tl.where(blk_max > m, v0 + blk_arg, arg)  # strict: the first maximum wins, as torch.argmax
    e = tl.exp((xm - m_new[:, None]) * inv_tau)
    alpha = tl.exp((m - m_new) * inv_tau)
    s = s * alpha + tl.sum(e, axis=1)
    if TWO_TEMPS:
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(xm - m_new[:, None]), axis=1)
    return m_new, s, s1, arg, e, alpha


@triton.jit
def _stats_kernel(HT, WT, HS, WS, Y, PART, ARG, N, V, CT, CS, n_splits, plane, inv_tau,
                  KIND: tl.constexpr, TWO_TEMPS: tl.constexpr, HAS_LABELS: tl.constexpr,
                  SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CT: tl.constexpr,
                  EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """PART [N_STATS, n_splits, N] fp32, ARG [2, n_splits, N] int32 (plane = n_splits N) for this
    program's tokens and split."""
    tile, split = _program_tile(N, n_splits, BLOCK_N, GROUP_N)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.full([BLOCK_N], -1, tl.int32)
    if HAS_LABELS:
        y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_N], tl.float32)
    s_s = tl.zeros([BLOCK_N], tl.float32)
    s1_t = tl.zeros([BLOCK_N], tl.float32)
    s1_s = tl.zeros([BLOCK_N], tl.float32)
    lab_t = tl.zeros([BLOCK_N], tl.float32)
    lab_s = tl.zeros([BLOCK_N], tl.float32)
    cross = tl.zeros([BLOCK_N], tl.float32)  # sum e (x_t - x_s) against the teacher (forward) or student (reverse)
    arg_t = tl.zeros([BLOCK_N], tl.int32)
    arg_s = tl.zeros([BLOCK_N], tl.int32)
    v_first = split * SPLIT_V
    for b in range(0, tl.cdiv(tl.minimum(V - v_first, SPLIT_V), BLOCK_V)):
        v0 = v_first + b * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        x_t, x_s = _both_logits(HT, WT, HS, WS, offs_n, offs_v, N, V, CT, CS, BLOCK_N, BLOCK_V, BLOCK_C,
                                EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
        m_t, s_t, s1_t, arg_t, e_t, alpha_t = _online(x_t, col_ok, v0, m_t, s_t, s1_t, arg_t, inv_tau, TWO_TEMPS)
        m_s, s_s, s1_s, arg_s, e_s, alpha_s = _online(x_s, col_ok, v0, m_s, s_s, s1_s, arg_s, inv_tau, TWO_TEMPS)
        if KIND == 0:
            cross = cross * alpha_t + tl.sum(e_t * (x_t - x_s), axis=1)
        elif KIND == 1:
            cross = cross * alpha_s + tl.sum(e_s * (x_s - x_t), axis=1)
        if HAS_LABELS:
            hit = offs_v[None, :] == y[:, None]
            lab_t += tl.sum(tl.where(hit, x_t, 0.0), axis=1)
            lab_s += tl.sum(tl.where(hit, x_s, 0.0), axis=1)
    if not TWO_TEMPS:
        s1_t = s_t
        s1_s = s_s
    at = split.to(tl.int64) * N + offs_n  # index into one [n_splits, N] plane of PART and ARG
    tl.store(PART + at, m_t, mask=row_ok)
    tl.store(PART + plane + at, s_t, mask=row_ok)
    tl.store(PART + 2 * plane + at, s1_t, mask=row_ok)
    tl.store(PART + 3 * plane + at, lab_t, mask=row_ok)
    tl.store(PART + 4 * plane + at, m_s, mask=row_ok)
    tl.store(PART + 5 * plane + at, s_s, mask=row_ok)
    tl.store(PART + 6 * plane + at, s1_s, mask=row_ok)
    tl.store(PART + 7 * plane + at, lab_s, mask=row_ok)
    tl.store(PART + 8 * plane + at, cross, mask=row_ok)
    tl.store(ARG + at, arg_t, mask=row_ok)
    tl.store(ARG + plane + at, arg_s, mask=row_ok)


@triton.jit
def _log_probs(x_t, x_s, lse_t, lse_s, inv_tau):
    """Tempered log-probabilities and probabilities of both models for one block, [BN, BV] each."""
    logp_t = x_t * inv_tau - lse_t[:, None]
    logp_s = x_s * inv_tau - lse_s[:, None]
    return logp_t, logp_s, tl.exp(logp_t), tl.exp(logp_s)


@triton.jit
def _jsd_kernel(HT, WT, HS, WS, ROW, PART, N, V, CT, CS, n_splits, plane, inv_tau, beta,
                SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CT: tl.constexpr,
                EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """PART [2, n_splits, N]: sum over the split of p_t log(p_t / m) and p_s log(p_s / m), m the mixture
    beta p_t + (1 - beta) p_s; ROW [2, N]: each model's log-sum-exp at 1/tau."""
    tile, split = _program_tile(N, n_splits, BLOCK_N, GROUP_N)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    lse_t = tl.load(ROW + offs_n, mask=row_ok, other=0.0)
    lse_s = tl.load(ROW + N + offs_n, mask=row_ok, other=0.0)
    kl_tm = tl.zeros([BLOCK_N], tl.float32)
    kl_sm = tl.zeros([BLOCK_N], tl.float32)
    v_first = split * SPLIT_V
    for b in range(0, tl.cdiv(tl.minimum(V - v_first, SPLIT_V), BLOCK_V)):
        offs_v = v_first + b * BLOCK_V + tl.arange(0, BLOCK_V)
        x_t, x_s = _both_logits(HT, WT, HS, WS, offs_n, offs_v, N, V, CT, CS, BLOCK_N, BLOCK_V, BLOCK_C,
                                EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
        logp_t, logp_s, p_t, p_s = _log_probs(x_t, x_s, lse_t, lse_s, inv_tau)
        mix = beta * p_t + (1 - beta) * p_s
        log_mix = tl.log(mix)
        keep = (offs_v < V)[None, :] & (mix > 0)  # mix == 0: both p underflowed, their terms are 0
        kl_tm += tl.sum(tl.where(keep, p_t * (logp_t - log_mix), 0.0), axis=1)
        kl_sm += tl.sum(tl.where(keep, p_s * (logp_s - log_mix), 0.0), axis=1)
    at = split.to(tl.int64) * N + offs_n
    tl.store(PART + at, kl_tm, mask=row_ok)
    tl.store(PART + plane + at, kl_sm, mask=row_ok)


@triton.jit
def _dz_kernel(HT, WT, HS, WS, Y, ROW, DZ, N, V, CT, CS, n_splits, inv_tau, tau, beta, ce_weight, inv_count,
               KIND: tl.constexpr, TWO_TEMPS: tl.constexpr, HAS_CE: tl.constexpr,
               SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CT: tl.constexpr,
               EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """DZ [N, V] = d(loss)/d(student logits) = inv_count (tau dD/dz_s + ce_weight (softmax(x_s) - onehot)).
    ROW [4, N]: lse_t, lse_s (at 1/tau), lse_s at 1, and per kind: - | KL(p_s||p_t) | KL(p_s||m)."""
    tile, split = _program_tile(N, n_splits, BLOCK_N, GROUP_N)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    lse_t = tl.load(ROW + offs_n, mask=row_ok, other=0.0)
    lse_s = tl.load(ROW + N + offs_n, mask=row_ok, other=0.0)
    lse1_s = tl.load(ROW + 2 * N + offs_n, mask=row_ok, other=0.0)
    aux = tl.load(ROW + 3 * N + offs_n, mask=row_ok, other=0.0)
    y = tl.full([BLOCK_N], -1, tl.int32)
    if HAS_CE:
        y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    p_dz = DZ + offs_n.to(tl.int64)[:, None] * V
    v_first = split * SPLIT_V
    for b in range(0, tl.cdiv(tl.minimum(V - v_first, SPLIT_V), BLOCK_V)):
        offs_v = v_first + b * BLOCK_V + tl.arange(0, BLOCK_V)
        x_t, x_s = _both_logits(HT, WT, HS, WS, offs_n, offs_v, N, V, CT, CS, BLOCK_N, BLOCK_V, BLOCK_C,
                                EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
        logp_t, logp_s, p_t, p_s = _log_probs(x_t, x_s, lse_t, lse_s, inv_tau)
        if KIND == 0:
            g = p_s - p_t
        elif KIND == 1:
            g = p_s * (logp_s - logp_t - aux[:, None])
        else:
            mix = beta * p_t + (1 - beta) * p_s
            g = tl.where(mix > 0, (1 - beta) * p_s * (logp_s - tl.log(mix) - aux[:, None]), 0.0)
        g = g * tau
        if HAS_CE:
            if TWO_TEMPS:
                p1 = tl.exp(x_s - lse1_s[:, None])
            else:
                p1 = p_s
            g += ce_weight * (p1 - tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0))
        g = g * inv_count
        tl.store(p_dz + offs_v[None, :], g.to(DZ.dtype.element_ty), mask=row_ok[:, None] & (offs_v < V)[None, :])


def _widen(device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether the dots must take fp32 copies of half operands: the Triton interpreter (3.9) multiplies
    bf16 tiles as raw 16-bit integers. bf16 x bf16 products are exact in fp32, so the widened dot is the
    GPU's bf16 MMA with fp32 accumulation, up to the order of the sum."""
    return device.type != "cuda" and any(dt != torch.float32 for dt in dtypes)


def _merge(m: Tensor, s: Tensor, s1: Tensor, inv_tau: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One model's split partials [n_splits, N] -> (lse at 1/tau [N], lse at 1 [N], the split weights
    e^{(m_r - m)/tau} [n_splits, N], the exp-sum total at 1/tau [N], the split holding the argmax [N])."""
    top, best = m.max(0)  # the first split among equal maxima, as torch.argmax over the vocabulary
    weight = torch.exp((m - top) * inv_tau)
    total = (s * weight).sum(0)
    lse1 = top + (s1 * torch.exp(m - top)).sum(0).log()
    return top * inv_tau + total.log(), lse1, weight, total, best


def _dz_rows(V: int, itemsize: int, blocks: Blocks) -> int:
    """Tokens per dz chunk: DZ_BUDGET_BYTES of [chunk, V], a whole number of token tiles."""
    return max(blocks.n, DZ_BUDGET_BYTES // (V * itemsize) // blocks.n * blocks.n)


def linear_kl_triton(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, *,
    temperature: float, kind: str, beta: float, ce_weight: float, need_dh: bool, need_dw: bool,
    blocks: Blocks | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(sums [4], dh_s [N, C_s] | None, dW_s [V, C_s] fp32 | None), as kernels.linear_kl_torch.linear_kl_torch.

    h_s [N, C_s], w_s [V, C_s], h_t [N, C_t], w_t [V, C_t]: bf16, fp16 or fp32 (IEEE dots), each
    model's pair in one dtype; labels [N] or None.
    """
    blk = blocks or blocks_for(h_s.device)
    h_s, w_s, h_t, w_t = (x.contiguous() for x in (h_s, w_s, h_t, w_t))
    (N, CS), (V, CT) = h_s.shape, w_t.shape
    y = None if labels is None else labels.to(torch.int32).contiguous()
    n_splits = triton.cdiv(V, blk.split_v)
    inv_tau, two_temps = 1.0 / temperature, temperature != 1.0
    shape = dict(SPLIT_V=blk.split_v, BLOCK_N=blk.n, BLOCK_V=blk.v, BLOCK_C=blk.c, GROUP_N=blk.group_n,
                 EVEN_CT=CT % blk.c == 0, EVEN_CS=CS % blk.c == 0, DOT_T=dot_precision(h_t.dtype),
                 DOT_S=dot_precision(h_s.dtype), WIDEN=_widen(h_s.device, h_s.dtype, h_t.dtype),
                 num_warps=blk.warps, num_stages=blk.stages)

    def grid(n: int) -> tuple[int]:
        return (triton.cdiv(n, blk.n) * n_splits,)

    part = h_s.new_empty(N_STATS, n_splits, N, dtype=torch.float32)
    arg = h_s.new_empty(2, n_splits, N, dtype=torch.int32)
    _stats_kernel[grid(N)](h_t, w_t, h_s, w_s, y, part, arg, N, V, CT, CS, n_splits, n_splits * N, inv_tau,
                           KIND=KIND_CODES[kind], TWO_TEMPS=two_temps, HAS_LABELS=y is not None, **shape)
    m_t, s_t, s1_t, lab_t, m_s, s_s, s1_s, lab_s, cross = part.unbind(0)
    lse_t, lse1_t, weight_t, total_t, best_t = _merge(m_t, s_t, s1_t, inv_tau)
    lse_s, lse1_s, weight_s, total_s, best_s = _merge(m_s, s_s, s1_s, inv_tau)
    if kind == "forward":  # E_{p_t}[z_t - z_s] - lse_t + lse_s
        d = (cross * weight_t).sum(0) * inv_tau / total_t - lse_t + lse_s
        aux = d
    elif kind == "reverse":
        d = (cross * weight_s).sum(0) * inv_tau / total_s - lse_s + lse_t
        aux = d
    else:
        mix_part = h_s.new_empty(2, n_splits, N, dtype=torch.float32)
        _jsd_kernel[grid(N)](h_t, w_t, h_s, w_s, torch.stack([lse_t, lse_s]), mix_part, N, V, CT, CS,
                             n_splits, n_splits * N, inv_tau, beta, **shape)
        kl_tm, kl_sm = mix_part.sum(1)
        d = beta * kl_tm + (1 - beta) * kl_sm
        aux = kl_sm
    top1 = arg[0].gather(0, best_t[None]) == arg[1].gather(0, best_s[None])
    nan = torch.full_like(d, float("nan"))
    nll_s = nan if y is None else lse1_s - lab_s.sum(0)
    nll_t = nan if y is None else lse1_t - lab_t.sum(0)
    sums = torch.stack([temperature**2 * d.sum(), nll_s.sum(), nll_t.sum(), top1.sum().float()])
    if not (need_dh or need_dw):
        return sums, None, None

    rows = torch.stack([lse_t, lse_s, lse1_s, aux])  # [4, N]
    chunk = min(N, _dz_rows(V, h_s.element_size(), blk))
    dz_buffer = h_s.new_empty(chunk, V)
    dh = torch.empty_like(h_s) if need_dh else None
    dw = torch.zeros_like(w_s, dtype=accumulate_dtype(w_s.dtype)) if need_dw else None
    has_ce = ce_weight != 0
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        dz = dz_buffer[: end - start]
        _dz_kernel[grid(end - start)](
            h_t[start:end], w_t, h_s[start:end], w_s, y[start:end] if has_ce else None,
            rows[:, start:end].contiguous(), dz, end - start, V, CT, CS, n_splits, inv_tau, temperature, beta,
            ce_weight, 1.0 / N, KIND=KIND_CODES[kind], TWO_TEMPS=two_temps, HAS_CE=has_ce, **shape)
        if need_dh:
            dh[start:end] = dz @ w_s
        if need_dw:
            addmm_acc(dw, dz.t(), h_s[start:end])
    return sums, dh, dw
