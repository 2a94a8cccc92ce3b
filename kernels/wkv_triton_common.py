"""Pieces shared by the WKV-6 and WKV-7 Triton kernels: input checks, the chunk layout of
(packed) sequences, and small in-kernel helpers. How the walks are laid out over programs is in
kernels/wkv_triton_walk.py.

Shapes: B batch, T time, H heads, K = V = N channels per head; BT chunk length, BV value block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_N = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_GRID_Y = 65535  # grid = (value blocks, sequences x heads): value blocks of one head launch together


def check_inputs(
    name: str, seq: dict[str, Tensor], initial_state: Tensor | None, cu_seqlens: Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate [B, T, H, N] inputs; returns (B, T, H, N, number of sequences)."""
    first = next(iter(seq.values()))
    if first.dim() != 4:
        raise ValueError(f"{name}: inputs must be [B, T, H, N], got shape {tuple(first.shape)}")
    B, T, H, N = first.shape
    for key, x in seq.items():
        if x.shape != first.shape:
            raise ValueError(f"{name}: {key} has shape {tuple(x.shape)}, expected {tuple(first.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: {key} has dtype {x.dtype}; valid: bfloat16, float16, float32")
    if N not in SUPPORTED_N:
        raise ValueError(f"{name}: head size N={N} is not served by the Triton kernels; valid: {SUPPORTED_N}")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"{name}: cu_seqlens needs batch size 1 (packed sequences), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"{name}: cu_seqlens must be [n+1] offsets ending at T={T}, got {cu_seqlens.tolist()}")
        n_seq = cu_seqlens.numel() - 1
    if n_seq * H > MAX_GRID_Y:
        raise ValueError(f"{name}: sequences x heads = {n_seq} x {H} exceeds the {MAX_GRID_Y} programs a CUDA "
                         f"grid's second axis holds; split the batch")
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, H, N, N):
        raise ValueError(f"{name}: initial_state has shape {tuple(initial_state.shape)}, expected {(n_seq, H, N, N)}")
    return B, T, H, N, n_seq


def grad_wanted(*xs: Tensor | None) -> bool:
    """Whether autograd will ask for a backward: inside autograd.Function.forward, ctx.needs_input_grad
    is True under torch.no_grad too, and the forward would then save a state per chunk for nothing."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def chunk_layout(T: int, n_seq: int, cu_seqlens: Tensor | None, BT: int) -> tuple[Tensor | None, int]:
    """Index of each sequence's first chunk ([n_seq + 1] int32, None when not packed) and the chunk count."""
    if cu_seqlens is None:
        return None, n_seq * triton.cdiv(T, BT)
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    chunks = torch.cat([lens.new_zeros(1), torch.cumsum((lens + BT - 1) // BT, 0)])
    return chunks.to(torch.int32), int(chunks[-1])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE dots (tf32 alone misses the 1e-4 contract); half inputs tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


# (I - A)^{-1}'s dots for half inputs. Triton runs IEEE fp32 dots as FMA loops, and an H100 run
# measured plain tf32 1.03x to 1.10x faster forward+backward than IEEE or tf32x3 with no accuracy
# change visible at the bf16 contract (kernels/NOTES.md v3.4; tests emulate the tf32 rounding).
HALF_INVERSE_PRECISION = "tf32"


def inverse_precision(dtype: torch.dtype) -> str:
    """Dot precision inside unit_tril_inverse: IEEE for fp32 inputs (the 1e-4 contract)."""
    return "ieee" if dtype == torch.float32 else HALF_INVERSE_PRECISION


def block_v(N: int) -> int:
    """Value-block width: each program owns V columns [i_v*BV, (i_v+1)*BV) of the state.

    64 measured faster than 32 at N = 64 (BENCHMARKS.md, kernels/NOTES.md v3): one value block
    computes the K-side work once; at N = 128 a 64-wide fp32 backward needs more shared memory
    than an H100 has."""
    return min(N, 64) if N <= 64 else 32


def partial_grad(x: Tensor, NV: int) -> Tensor:
    """Room for per-value-block partial gradients of x, [NV, *x.shape]: fp32 when NV > 1 (they are
    summed); with one block the kernel writes the gradient in x's dtype (no separate cast pass)."""
    return x.new_empty(NV, *x.shape, dtype=torch.float32 if NV > 1 else x.dtype)


def reduce_parts(part: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum the per-value-block partial gradients [NV, ...] and cast to the input dtype."""
    return (part[0] if part.shape[0] == 1 else part.sum(0)).to(dtype)


@triton.jit
def chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Pointers [BT, BD] to rows [i_t*BT, (i_t+1)*BT) and columns [i_d*BD, (i_d+1)*BD) of head i_h
    of the sequence [bos, eos) in a [*, H, D] tensor, and the mask of rows before eos."""
    o_t = bos + i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    return x + (o_t[:, None] * H + i_h) * D + o_d[None, :], (o_t < eos)[:, None]


@triton.jit
def load_chunk(x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """fp32 [BT, BD] block of a [*, H, D] tensor; zero past eos."""
    return load_chunk_raw(x, bos, eos, i_h, i_t, i_d, H, D, BT, BD).to(tl.float32)


@triton.jit
def load_chunk_raw(x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr):
    """load_chunk in x's own dtype: a walk loads the next chunk a whole iteration before it uses it."""
    p_x, m_x = chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H, D, BT, BD)
    return tl.load(p_x, mask=m_x, other=0.0)


@triton.jit
def store_chunk(x, b_x, bos, eos, i_h, i_t, i_d, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr):
    p_x, m_x = chunk_ptrs(x, bos, eos, i_h, i_t, i_d, H, D, BT, BD)
    tl.store(p_x, b_x.to(p_x.dtype.element_ty), mask=m_x)


@triton.jit
def store_output(o, b_o, bos, eos, i_h, i_t, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, BV: tl.constexpr, TRANSITION: tl.constexpr):
    """A walk's output block: into o [*, H, V] or, in a transition pass, into o [*, H, V + K] where
    value block i_v >= V / BV (the identity columns) lands in the last K columns."""
    if TRANSITION:
        store_chunk(o, b_o, bos, eos, i_h, i_t, i_v, H, V + K, BT, BV)
    else:
        store_chunk(o, b_o, bos, eos, i_h, i_t, i_v, H, V, BT, BV)


@triton.jit
def state_ptr(s, i_s, i_v, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """Pointers [K, BV] to columns [i_v*BV, (i_v+1)*BV) of state number i_s in a [*, K, V] tensor."""
    return s + i_s.to(tl.int64) * K * V + tl.arange(0, K)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :]


@triton.jit
def walk_start(h0, i_nh, i_v, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
               TRANSITION: tl.constexpr):
    """The state [K, BV] a walk starts from (h0, else zeros; the backward passes dS_T) and the factor
    on v (1). In a transition pass, programs past the V / BV value blocks carry identity columns with
    v off (0), so their end state is a block of columns of the segment's M."""
    b_s = tl.zeros([K, BV], dtype=tl.float32)
    if USE_H0:
        b_s = tl.load(state_ptr(h0, i_nh, i_v, K, V, BV)).to(tl.float32)
    v_on = 1.0
    if TRANSITION:
        NV: tl.constexpr = V // BV
        b_s = tl.where(tl.arange(0, K)[:, None] == (i_v - NV) * BV + tl.arange(0, BV)[None, :], 1.0, 0.0)
        v_on = (i_v < NV).to(tl.float32)
    return b_s, v_on


@triton.jit
def walk_end(ht, b_s, i_nh, i_v, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, STORE_HT: tl.constexpr,
             TRANSITION: tl.constexpr):
    """Store a forward walk's end state: into [n, H, K, V + K] ([D | M]) in a transition pass."""
    if TRANSITION:
        tl.store(state_ptr(ht, i_nh, i_v, K, V + K, BV), b_s)
    elif STORE_HT:
        tl.store(state_ptr(ht, i_nh, i_v, K, V, BV), b_s)


@triton.jit
def chunk_decays(b_w):
    """Decay factors of one chunk from its log decays b_w [BT, K] (padded rows have w = 0).

    g = cumsum(w) - ref with ref = g_BT / 2, so every factor that grows stays within half the
    chunk's total log decay (RWKV-6 at w = -5 with BT = 16: e^{+-40}, far inside fp32).
    Returns e^{g_BT} [K] and, each [BT, K]: e^{g}, e^{g - w} (exclusive: a_t meets S_{t-1}), e^{-g},
    the same two measured from the chunk start (e^{G}, e^{G - w}), and e^{G_BT - G} to the chunk end.
    """
    b_G, b_Gl, b_g = _log_decays(b_w)
    return (tl.exp(b_Gl), tl.exp(b_g), tl.exp(b_g - b_w), tl.exp(-b_g), tl.exp(b_G), tl.exp(b_G - b_w),
            tl.exp(b_Gl[None, :] - b_G))


@triton.jit
def chunk_decays_ref(b_w):
    """chunk_decays' factors with fewer live tiles: e^{g_BT} [K], e^{ref} [1, K], e^{g}, e^{g - w}, e^{-g}.
    The other three are these times e^{ref}: e^{G} = e^{g} e^{ref}, e^{G - w} = e^{g - w} e^{ref},
    e^{G_BT - G} = e^{-g} e^{ref} (ref <= 0: the products never overflow)."""
    _, b_Gl, b_g = _log_decays(b_w)
    return tl.exp(b_Gl), tl.exp(0.5 * b_Gl)[None, :], tl.exp(b_g), tl.exp(b_g - b_w), tl.exp(-b_g)


@triton.jit
def _log_decays(b_w):
    """Inclusive log decay from the chunk start G [BT, K], the chunk's total G_BT [K], g = G - G_BT / 2."""
    b_G = tl.cumsum(b_w, axis=0)
    b_Gl = tl.sum(b_w, axis=0)
    return b_G, b_Gl, b_G - 0.5 * b_Gl[None, :]


@triton.jit
def intra(b_x, b_y, m, PREC: tl.constexpr):
    """[BT, BT] masked x y^T."""
    return tl.where(m, tl.dot(b_x, tl.trans(b_y), input_precision=PREC), 0.0)


@triton.jit
def seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, one past the last token, index of the first chunk) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, c0


@triton.jit
def unit_tril_inverse(b_A, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^{-1} for strictly lower-triangular A [BT, BT].

    A is nilpotent (A^BT = 0), so (I - A)^{-1} = (I + A)(I + A^2)(I + A^4)...(I + A^{BT/2}):
    2 log2(BT) - 2 small matrix products instead of a serial row-by-row substitution.
    """
    o_t = tl.arange(0, BT)
    b_P = (o_t[:, None] == o_t[None, :]).to(tl.float32) + b_A  # [BT, BT]
    b_Ap = b_A
    for _ in tl.static_range(LOG2_BT - 1):
        b_Ap = tl.dot(b_Ap, b_Ap, input_precision=PREC)
        b_P = b_P + tl.dot(b_P, b_Ap, input_precision=PREC)
    return b_P


@triton.jit
def reverse_cumsum(b_x):
    """y_t = sum_{s >= t} x_s along axis 0."""
    return tl.sum(b_x, axis=0)[None, :] - tl.cumsum(b_x, axis=0) + b_x

