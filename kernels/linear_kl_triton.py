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
# GEMM tile; the models' K-loops run one after the other, each pipelining 3 stages of its two bf16
# operand tiles ([128, 64] + [64, 128]): 96 KB of shared memory.
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
def _split_blocks(split, V, SPLIT_V: tl.constexpr, BLOCK_V: tl.constexpr):
    """First vocabulary entry of a split and its number of BLOCK_V blocks (the last split may be short)."""
    v_first = split * SPLIT_V
    return v_first, tl.cdiv(tl.minimum(V - v_first, SPLIT_V), BLOCK_V)


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
def _stats_kernel(HA, WA, HB, WB, Y, PART, ARG, N, V, CA, CB, n_splits, plane, inv_tau,
                  HAS_CROSS: tl.constexpr, TWO_TEMPS: tl.constexpr, HAS_LABELS: tl.constexpr,
                  SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CA: tl.constexpr,
                  EVEN_CB: tl.constexpr, DOT_A: tl.constexpr, DOT_B: tl.constexpr, WIDEN: tl.constexpr):
    """Pass 1 for models A and B (A = the one whose probabilities weigh the cross term: the teacher for
    forward KL, the student for reverse). PART [N_STATS, n_splits, N] fp32 = m, s, s1, label logit of
    A, the same of B, then cross = sum e_A (x_A - x_B); ARG [2, n_splits, N] int32 (plane = n_splits N).
    A's tile is folded (cross term included) before B's exp tile exists, so at most three [BN, BV] fp32
    tiles are live at once."""
    tile, split = _program_tile(N, n_splits, BLOCK_N, GROUP_N)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    y = tl.full([BLOCK_N], -1, tl.int32)
    if HAS_LABELS:
        y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    m_a = tl.full([BLOCK_N], float("-inf"), tl.float32)
    m_b = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    s_b = tl.zeros([BLOCK_N], tl.float32)
    s1_a = tl.zeros([BLOCK_N], tl.float32)
    s1_b = tl.zeros([BLOCK_N], tl.float32)
    lab_a = tl.zeros([BLOCK_N], tl.float32)
    lab_b = tl.zeros([BLOCK_N], tl.float32)
    cross = tl.zeros([BLOCK_N], tl.float32)
    arg_a = tl.zeros([BLOCK_N], tl.int32)
    arg_b = tl.zeros([BLOCK_N], tl.int32)
    v_first, n_blocks = _split_blocks(split, V, SPLIT_V, BLOCK_V)
    for b in range(0, n_blocks):
        v0 = v_first + b * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        x_a, x_b = _both_logits(HA, WA, HB, WB, offs_n, offs_v, N, V, CA, CB, BLOCK_N, BLOCK_V, BLOCK_C,
                                EVEN_CA, EVEN_CB, DOT_A, DOT_B, WIDEN)
        m_a, s_a, s1_a, arg_a, e_a, alpha_a = _online(x_a, col_ok, v0, m_a, s_a, s1_a, arg_a, inv_tau, TWO_TEMPS)
        if HAS_CROSS:
            cross = cross * alpha_a + tl.sum(e_a * (x_a - x_b), axis=1)
        if HAS_LABELS:
            hit = offs_v[None, :] == y[:, None]
            lab_a += tl.sum(tl.where(hit, x_a, 0.0), axis=1)
            lab_b += tl.sum(tl.where(hit, x_b, 0.0), axis=1)
        m_b, s_b, s1_b, arg_b, e_b, alpha_b = _online(x_b, col_ok, v0, m_b, s_b, s1_b, arg_b, inv_tau, TWO_TEMPS)
    if not TWO_TEMPS:
        s1_a = s_a
        s1_b = s_b
    at = split.to(tl.int64) * N + offs_n  # index into one [n_splits, N] plane of PART and ARG
    tl.store(PART + at, m_a, mask=row_ok)
    tl.store(PART + plane + at, s_a, mask=row_ok)
    tl.store(PART + 2 * plane + at, s1_a, mask=row_ok)
    tl.store(PART + 3 * plane + at, lab_a, mask=row_ok)
    tl.store(PART + 4 * plane + at, m_b, mask=row_ok)
    tl.store(PART + 5 * plane + at, s_b, mask=row_ok)
    tl.store(PART + 6 * plane + at, s1_b, mask=row_ok)
    tl.store(PART + 7 * plane + at, lab_b, mask=row_ok)
    tl.store(PART + 8 * plane + at, cross, mask=row_ok)
    tl.store(ARG + at, arg_a, mask=row_ok)
    tl.store(ARG + plane + at, arg_b, mask=row_ok)


@triton.jit
def _pass2_rows(ROW, N, n_splits, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """A pass-2 program's split, tokens, their mask and the final log-sum-exps at 1/tau (ROW[0], ROW[1])."""
    tile, split = _program_tile(N, n_splits, BLOCK_N, GROUP_N)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    lse_t = tl.load(ROW + offs_n, mask=row_ok, other=0.0)
    lse_s = tl.load(ROW + N + offs_n, mask=row_ok, other=0.0)
    return split, offs_n, row_ok, lse_t, lse_s


@triton.jit
def _block_probs(HT, WT, HS, WS, offs_n, v0, N, V, CT, CS, lse_t, lse_s, inv_tau, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_CT: tl.constexpr, EVEN_CS: tl.constexpr,
                 DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """The block of entries v0 + [0, BLOCK_V): its indices, raw student logits and both models' tempered
    log-probabilities and probabilities (lse_t, lse_s [BN]: the final log-sum-exps at 1/tau), [BN, BV] each."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    x_t, x_s = _both_logits(HT, WT, HS, WS, offs_n, offs_v, N, V, CT, CS, BLOCK_N, BLOCK_V, BLOCK_C,
                            EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
    logp_t = x_t * inv_tau - lse_t[:, None]
    logp_s = x_s * inv_tau - lse_s[:, None]
    return offs_v, x_s, logp_t, logp_s, tl.exp(logp_t), tl.exp(logp_s)


@triton.jit
def _jsd_kernel(HT, WT, HS, WS, ROW, PART, N, V, CT, CS, n_splits, plane, inv_tau, beta,
                SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CT: tl.constexpr,
                EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """PART [2, n_splits, N]: sum over the split of p_t log(p_t / m) and p_s log(p_s / m), m the mixture
    beta p_t + (1 - beta) p_s; ROW [2, N]: each model's log-sum-exp at 1/tau."""
    split, offs_n, row_ok, lse_t, lse_s = _pass2_rows(ROW, N, n_splits, BLOCK_N, GROUP_N)
    kl_tm = tl.zeros([BLOCK_N], tl.float32)
    kl_sm = tl.zeros([BLOCK_N], tl.float32)
    v_first, n_blocks = _split_blocks(split, V, SPLIT_V, BLOCK_V)
    for b in range(0, n_blocks):
        offs_v, x_s, logp_t, logp_s, p_t, p_s = _block_probs(
            HT, WT, HS, WS, offs_n, v_first + b * BLOCK_V, N, V, CT, CS, lse_t, lse_s, inv_tau,
            BLOCK_N, BLOCK_V, BLOCK_C, EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
        mix = beta * p_t + (1 - beta) * p_s
        log_mix = tl.log(mix)
        keep = (offs_v < V)[None, :] & (mix > 0)  # mix == 0: both p underflowed, their terms are 0
        kl_tm += tl.sum(tl.where(keep, p_t * (logp_t - log_mix), 0.0), axis=1)
        kl_sm += tl.sum(tl.where(keep, p_s * (logp_s - log_mix), 0.0), axis=1)
    at = split.to(tl.int64) * N + offs_n
    tl.store(PART + at, kl_tm, mask=row_ok)
    tl.store(PART + plane + at, kl_sm, mask=row_ok)


@triton.jit
def _dz_kernel(HT, WT, HS, WS, Y, ROW, DZ, N, V, CT, CS, n_splits, inv_tau, div_scale, beta, ce_weight, inv_count,
               KIND: tl.constexpr, TWO_TEMPS: tl.constexpr, HAS_CE: tl.constexpr,
               SPLIT_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_C: tl.constexpr, GROUP_N: tl.constexpr, EVEN_CT: tl.constexpr,
               EVEN_CS: tl.constexpr, DOT_T: tl.constexpr, DOT_S: tl.constexpr, WIDEN: tl.constexpr):
    """DZ [N, V] = d(loss)/d(student logits) = inv_count (div_scale dD/dz_s + ce_weight (softmax(x_s) - onehot)),
    div_scale = kl_weight tau (tau^2 D(x / tau): the chain rule's 1/tau leaves one tau).
    ROW [4, N]: lse_t, lse_s (at 1/tau), lse_s at 1, and per kind: - | KL(p_s||p_t) | KL(p_s||m)."""
    split, offs_n, row_ok, lse_t, lse_s = _pass2_rows(ROW, N, n_splits, BLOCK_N, GROUP_N)
    lse1_s = tl.load(ROW + 2 * N + offs_n, mask=row_ok, other=0.0)
    aux = tl.load(ROW + 3 * N + offs_n, mask=row_ok, other=0.0)
    y = tl.full([BLOCK_N], -1, tl.int32)
    if HAS_CE:
        y = tl.load(Y + offs_n, mask=row_ok, other=-1)
    p_dz = DZ + offs_n.to(tl.int64)[:, None] * V
    v_first, n_blocks = _split_blocks(split, V, SPLIT_V, BLOCK_V)
    for b in range(0, n_blocks):
        offs_v, x_s, logp_t, logp_s, p_t, p_s = _block_probs(
            HT, WT, HS, WS, offs_n, v_first + b * BLOCK_V, N, V, CT, CS, lse_t, lse_s, inv_tau,
            BLOCK_N, BLOCK_V, BLOCK_C, EVEN_CT, EVEN_CS, DOT_T, DOT_S, WIDEN)
        if KIND == 0:
            g = p_s - p_t
        elif KIND == 1:
            g = p_s * (logp_s - logp_t - aux[:, None])
        else:
            mix = beta * p_t + (1 - beta) * p_s
            g = tl.where(mix > 0, (1 - beta) * p_s * (logp_s - tl.log(mix) - aux[:, None]), 0.0)
        g = g * div_scale
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


@dataclass(frozen=True)
class _Launch:
    """What every pass of one call shares: sizes, the grid, and the constexprs of each model's dots."""

    N: int
    V: int
    CT: int
    CS: int
    n_splits: int
    blocks: Blocks
    widen: bool
    dot_t: str
    dot_s: str

    def grid(self, n: int) -> tuple[int]:
        return (triton.cdiv(n, self.blocks.n) * self.n_splits,)

    def meta(self) -> dict:
        b = self.blocks
        return dict(SPLIT_V=b.split_v, BLOCK_N=b.n, BLOCK_V=b.v, BLOCK_C=b.c, GROUP_N=b.group_n, WIDEN=self.widen,
                    num_warps=b.warps, num_stages=b.stages)

    def models(self) -> dict:
        """The pass-2 kernels' per-model constexprs (teacher T, student S)."""
        return dict(EVEN_CT=self.CT % self.blocks.c == 0, EVEN_CS=self.CS % self.blocks.c == 0,
                    DOT_T=self.dot_t, DOT_S=self.dot_s)


def _pass1(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, y: Tensor | None, kind: str, inv_tau: float,
           L: _Launch) -> dict[str, Tensor]:
    """Per-token [N] statistics: lse_t, lse_s (at 1/tau), lse1_t, lse1_s (at 1), the label logits, top-1
    agreement and (forward, reverse) the divergence D."""
    reverse = kind == "reverse"
    models = [(h_t, w_t, L.CT, L.dot_t), (h_s, w_s, L.CS, L.dot_s)]
    (h_a, w_a, c_a, dot_a), (h_b, w_b, c_b, dot_b) = models[::-1] if reverse else models
    part = h_s.new_empty(N_STATS, L.n_splits, L.N, dtype=torch.float32)
    arg = h_s.new_empty(2, L.n_splits, L.N, dtype=torch.int32)
    _stats_kernel[L.grid(L.N)](
        h_a, w_a, h_b, w_b, y, part, arg, L.N, L.V, c_a, c_b, L.n_splits, L.n_splits * L.N, inv_tau,
        HAS_CROSS=kind != "jsd", TWO_TEMPS=inv_tau != 1.0, HAS_LABELS=y is not None,
        EVEN_CA=c_a % L.blocks.c == 0, EVEN_CB=c_b % L.blocks.c == 0, DOT_A=dot_a, DOT_B=dot_b, **L.meta())
    first, second = part[:4], part[4:8]
    (m_t, s_t, s1_t, lab_t), (m_s, s_s, s1_s, lab_s) = (second, first) if reverse else (first, second)
    arg_t, arg_s = (arg[1], arg[0]) if reverse else (arg[0], arg[1])
    lse_t, lse1_t, weight_t, total_t, best_t = _merge(m_t, s_t, s1_t, inv_tau)
    lse_s, lse1_s, weight_s, total_s, best_s = _merge(m_s, s_s, s1_s, inv_tau)
    out = dict(lse_t=lse_t, lse_s=lse_s, lse1_t=lse1_t, lse1_s=lse1_s, lab_t=lab_t.sum(0), lab_s=lab_s.sum(0),
               top1=arg_t.gather(0, best_t[None])[0] == arg_s.gather(0, best_s[None])[0])
    if kind == "forward":  # E_{p_t}[z_t - z_s] - lse_t + lse_s
        out["d"] = (part[8] * weight_t).sum(0) * inv_tau / total_t - lse_t + lse_s
    elif reverse:  # E_{p_s}[z_s - z_t] - lse_s + lse_t
        out["d"] = (part[8] * weight_s).sum(0) * inv_tau / total_s - lse_s + lse_t
    return out


def _jsd_terms(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, lse_t: Tensor, lse_s: Tensor,
               inv_tau: float, beta: float, L: _Launch) -> tuple[Tensor, Tensor]:
    """Per-token KL(p_t || m) and KL(p_s || m), [N] each (pass 2 of kind jsd)."""
    part = h_s.new_empty(2, L.n_splits, L.N, dtype=torch.float32)
    _jsd_kernel[L.grid(L.N)](h_t, w_t, h_s, w_s, torch.stack([lse_t, lse_s]), part, L.N, L.V, L.CT, L.CS,
                             L.n_splits, L.n_splits * L.N, inv_tau, beta, **L.meta(), **L.models())
    return part.sum(1).unbind()


def _gradients(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, y: Tensor | None, rows: Tensor, *,
               kind: str, temperature: float, beta: float, ce_weight: float, kl_weight: float, need_dh: bool,
               need_dw: bool, row_scale: Tensor | None, L: _Launch) -> tuple[Tensor | None, Tensor | None]:
    """dh_s [N, C_s] and dW_s [V, C_s] (fp32): dz per token chunk (pass 3), then cuBLAS products.
    rows [4, N]: lse_t, lse_s, lse1_s, and the divergence (reverse) or KL(p_s || m) (jsd).
    row_scale [N]: each token's share of the mean (None: 1 / N). Scaling dz's rows commutes with both
    products, so it scales dh's rows and h_s's rows in dW instead: the kernel stays one for both cases."""
    chunk = min(L.N, _dz_rows(L.V, h_s.element_size(), L.blocks))
    dz_buffer = h_s.new_empty(chunk, L.V)
    dh = torch.empty_like(h_s) if need_dh else None
    dw = torch.zeros_like(w_s, dtype=accumulate_dtype(w_s.dtype)) if need_dw else None
    has_ce = ce_weight != 0
    for start in range(0, L.N, chunk):
        end = min(L.N, start + chunk)
        dz = dz_buffer[: end - start]
        _dz_kernel[L.grid(end - start)](
            h_t[start:end], w_t, h_s[start:end], w_s, y[start:end] if has_ce else None,
            rows[:, start:end].contiguous(), dz, end - start, L.V, L.CT, L.CS, L.n_splits, 1.0 / temperature,
            kl_weight * temperature, beta, ce_weight, 1.0 / L.N if row_scale is None else 1.0, KIND=KIND_CODES[kind],
            TWO_TEMPS=temperature != 1.0, HAS_CE=has_ce, **L.meta(), **L.models())
        scale = None if row_scale is None else row_scale[start:end, None]
        if need_dh:
            dh[start:end] = dz @ w_s if scale is None else (dz @ w_s) * scale.to(h_s.dtype)
        if need_dw:
            addmm_acc(dw, dz.t(), h_s[start:end] if scale is None else h_s[start:end] * scale.to(h_s.dtype))
    return dh, dw


def linear_kl_triton(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, *,
    temperature: float, kind: str, beta: float, ce_weight: float, need_dh: bool, need_dw: bool,
    row_scale: Tensor | None = None, blocks: Blocks | None = None, kl_weight: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(sums [4], dh_s [N, C_s] | None, dW_s [V, C_s] fp32 | None), as kernels.linear_kl_torch.linear_kl_torch.

    h_s [N, C_s], w_s [V, C_s], h_t [N, C_t], w_t [V, C_t]: bf16, fp16 or fp32 (IEEE dots), each
    model's pair in one dtype; labels [N] or None; row_scale [N] as in linear_kl_torch (an ignored label
    matches no vocabulary entry, and its token's row_scale is 0).
    """
    h_s, w_s, h_t, w_t = (x.contiguous() for x in (h_s, w_s, h_t, w_t))
    blk = blocks or blocks_for(h_s.device)
    (N, CS), (V, CT) = h_s.shape, w_t.shape
    L = _Launch(N=N, V=V, CT=CT, CS=CS, n_splits=triton.cdiv(V, blk.split_v), blocks=blk,
                widen=_widen(h_s.device, h_s.dtype, h_t.dtype), dot_t=dot_precision(h_t.dtype),
                dot_s=dot_precision(h_s.dtype))
    y = None if labels is None else labels.to(torch.int32).contiguous()
    inv_tau = 1.0 / temperature
    st = _pass1(h_s, w_s, h_t, w_t, y, kind, inv_tau, L)
    if kind == "jsd":
        kl_tm, kl_sm = _jsd_terms(h_s, w_s, h_t, w_t, st["lse_t"], st["lse_s"], inv_tau, beta, L)
        d, aux = beta * kl_tm + (1 - beta) * kl_sm, kl_sm
    else:
        d = aux = st["d"]
    nan = torch.full_like(d, float("nan"))
    nll_s = nan if y is None else st["lse1_s"] - st["lab_s"]
    nll_t = nan if y is None else st["lse1_t"] - st["lab_t"]
    top1 = st["top1"].float()
    if row_scale is not None:  # only counted tokens enter the sums
        counted = (row_scale > 0).float()
        d_sum, nll_s, nll_t, top1 = (d * counted).sum(), nll_s * counted, nll_t * counted, top1 * counted
    else:
        d_sum = d.sum()
    sums = torch.stack([temperature**2 * d_sum, nll_s.sum(), nll_t.sum(), top1.sum()])
    if not (need_dh or need_dw):
        return sums, None, None
    rows = torch.stack([st["lse_t"], st["lse_s"], st["lse1_s"], aux])  # [4, N]
    dh, dw = _gradients(h_s, w_s, h_t, w_t, y, rows, kind=kind, temperature=temperature, beta=beta,
                        ce_weight=ce_weight, kl_weight=kl_weight, need_dh=need_dh, need_dw=need_dw,
                        row_scale=row_scale, L=L)
    return sums, dh, dw
