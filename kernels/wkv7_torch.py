"""Chunked pure-PyTorch WKV7 (any device, gradients by autograd). Derivation: DERIVATION.md.

Shapes: B batch, T time, H heads, K = V = N channels, NC chunks of C tokens.
The chunk layout (padding, packed sequences), the state scan and the decay helpers here are
shared with wkv6_torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 16


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 when any input is float64 (tests), else float32: states and sums are never narrower."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


@dataclass(frozen=True)
class ChunkLayout:
    """Where the tokens of [B, T, H, N] inputs go in chunked form [B, H, NC, C, N].

    Unpacked: each row is zero-padded at its end to whole chunks; one segment, all rows at once.
    Packed (cu_seqlens, B = 1): each sequence starts a new chunk and is zero-padded to whole chunks
    (at most C - 1 pad tokens per sequence); segment i = (first chunk, number of chunks) of
    sequence i, and the scan restarts from that sequence's initial state there.
    Zero padding is harmless for every WKV operand: log decay 0 keeps the state, k = b = 0 add nothing.
    """

    T: int
    chunk: int
    segments: tuple[tuple[int, int], ...]
    index: Tensor | None  # [T] padded time position of every packed token; None when unpacked

    @staticmethod
    def of(T: int, chunk: int, cu_seqlens: Tensor | None) -> "ChunkLayout":
        if cu_seqlens is None:
            return ChunkLayout(T, chunk, ((0, -(-T // chunk)),), None)
        bounds = cu_seqlens.tolist()
        counts = [-(-(end - start) // chunk) for start, end in zip(bounds, bounds[1:])]
        firsts = [0, *accumulate(counts)][:-1]
        index = [first * chunk + t for first, start, end in zip(firsts, bounds, bounds[1:])
                 for t in range(end - start)]
        index = torch.tensor(index, dtype=torch.long, device=cu_seqlens.device)
        return ChunkLayout(T, chunk, tuple(zip(firsts, counts)), index)

    @property
    def n_chunks(self) -> int:
        return sum(count for _, count in self.segments)

    def to_chunks(self, x: Tensor) -> Tensor:
        """[B, T, H, N] -> [B, H, NC, C, N] (contiguous: the matmuls then never copy per matrix)."""
        B, _, H, N = x.shape
        padded_T = self.n_chunks * self.chunk
        if self.index is None:
            x = F.pad(x, (0, 0, 0, 0, 0, padded_T - self.T))
        else:
            x = x.new_zeros(1, padded_T, H, N).index_copy(1, self.index, x)
        return x.reshape(B, self.n_chunks, self.chunk, H, N).permute(0, 3, 1, 2, 4).contiguous()

    def from_chunks(self, x: Tensor) -> Tensor:
        """[B, H, NC, C, V] -> [B, T, H, V], dropping the padding."""
        B, H, nc, C, V = x.shape
        x = x.permute(0, 2, 3, 1, 4).reshape(B, nc * C, H, V)
        return x[:, :self.T] if self.index is None else x[:, self.index]

    def start_state(self, initial_state: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor:
        """initial_state in dtype, or zeros [B or n_seqs, H, K, V] for inputs x [B, T, H, N]."""
        if initial_state is not None:
            return initial_state.to(dtype)
        B, _, H, N = x.shape
        return x.new_zeros(B if self.index is None else len(self.segments), H, N, N, dtype=dtype)

    def initial_states(self, S0: Tensor) -> list[Tensor]:
        """The state each segment starts from: all rows of S0 [B, ..] at once, or one row per sequence."""
        return [S0] if self.index is None else list(S0.split(1))


def scan_chunks(P: Tensor, X: Tensor, layout: ChunkLayout, S0: Tensor) -> tuple[Tensor, Tensor]:
    """S_c = P_c S_{c-1} + X_c over the chunks of each segment; the only sequential part.

    P: [B, H, NC, K, K] (or [B, H, NC, K, 1] for a diagonal P), X: [B, H, NC, K, V], S0: [B or n_seqs, H, K, V].
    Returns the state entering every chunk [B, H, NC, K, V] and the final states [B or n_seqs, H, K, V].
    """
    diagonal = P.shape[-1] == 1
    # chunk-major and contiguous: each step's matmul reads dense blocks; unbind's backward is one stack
    Ps, Xs = P.movedim(2, 0).contiguous().unbind(0), X.movedim(2, 0).contiguous().unbind(0)
    entering, finals = [], []
    for (first, count), S in zip(layout.segments, layout.initial_states(S0)):
        for c in range(first, first + count):
            entering.append(S)
            S = (Ps[c] * S if diagonal else Ps[c] @ S) + Xs[c]
        finals.append(S)
    if not entering:  # T = 0: no chunks; X is the empty [B, H, 0, K, V]
        return X, torch.cat(finals)
    return torch.stack(entering, dim=2), torch.cat(finals)


def chunk_log_decays(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cumulative log decays inside each chunk, w [B, H, NC, C, K] -> (each [.., C, K] or [.., 1, K]):

    g     = w_0 + .. + w_t         (chunk start through t)
    g_ex  = w_0 + .. + w_{t-1}     (0 at t = 0)
    g_out = w_{t+1} + .. + w_{C-1} (t to the chunk end; 0 at t = C-1)
    g_ref = g at mid-chunk [.., 1, K], so |g - g_ref| <= (C/2 + 1) max|w| (DERIVATION.md).
    Each is its own (reverse) cumsum, never a difference such as g - w: a decay that is exactly 1
    then has no w in its graph, and its w-gradient is exactly 0 instead of a large +x - x.
    """
    C = w.shape[-2]
    g = w.cumsum(-2)
    g_ex = F.pad(g[..., :-1, :], (0, 0, 1, 0))
    g_out = F.pad(w[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))
    return g, g_ex, g_out, g[..., C // 2:C // 2 + 1, :]


def decay_pairs(q_dec: Tensor, k_dec: Tensor, q: Tensor, k: Tensor, offset: int) -> Tensor:
    """A[t, s] = sum_i q_ti k_si e^{(log decay from s to t)_i} for s <= t + offset, else 0: [.., C, C].

    q_dec = q e^{g_q - g_ref}, k_dec = k e^{g_ref - g_k} carry the decay as two bounded factors.
    The band s = t + offset (offset 0 or -1) is the pair whose decay is exactly 1: it is q_t . k_s
    computed without the factors, whose w-gradients would cancel only to rounding (DERIVATION.md).
    """
    C, n = q.shape[-2], -offset
    band = (q[..., n:, :] * k[..., :C - n, :]).sum(-1)            # [.., C - n]
    return (q_dec @ k_dec.mT).tril(offset - 1) + torch.diag_embed(band, offset)


def _chunk_wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                layout: ChunkLayout, S0: Tensor) -> tuple[Tensor, Tensor]:
    """WKV7 on chunked inputs [B, H, NC, C, N] (compute dtype, r already scaled), S0 [B or n_seqs, H, K, V].

    Returns o [B, H, NC, C, V] and the final states [B or n_seqs, H, K, V]. DERIVATION.md §WKV7.
    """
    C, K = w.shape[-2:]
    g, g_ex, g_out, g_ref = chunk_log_decays(w)
    a_dec, r_dec = a * (g_ex - g_ref).exp(), r * (g - g_ref).exp()   # query sides: a^T S_{t-1}, S_t^T r
    into = (g_ref - g).exp()
    b_dec, k_dec = b * into, k * into                                 # key sides
    A_ab, A_ak = decay_pairs(a_dec, b_dec, a, b, -1), decay_pairs(a_dec, k_dec, a, k, -1)  # s < t
    A_rb, A_rk = decay_pairs(r_dec, b_dec, r, b, 0), decay_pairs(r_dec, k_dec, r, k, 0)    # s <= t
    # sa_t = S_{t-1}^T a_t for the whole chunk = W S0 + U (WY form):
    # (I - A_ab) [W | U] = [a e^{g_ex} | A_ak v]
    eye = torch.eye(C, dtype=w.dtype, device=w.device)
    rhs = torch.cat([a * g_ex.exp(), A_ak @ v], -1)                  # [.., C, K + V]
    WU = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    W, U = (x.contiguous() for x in WU.split(K, -1))  # strided views make CPU bmm backward copy per matrix
    Q = r * g.exp() + A_rb @ W                 # [.., C, K]  o = Q S0 + O_in
    O_in = A_rb @ U + A_rk @ v                 # [.., C, V]
    out = g_out.exp()
    b_out, k_out = b * out, k * out            # [.., C, K] decayed to the chunk end
    P = torch.diag_embed(g[..., -1, :].exp()) + b_out.mT @ W         # [.., K, K] S_C = P S0 + X
    X = b_out.mT @ U + k_out.mT @ v            # [.., K, V]
    entering, S_T = scan_chunks(P, X, layout, S0)
    return O_in + Q @ entering, S_T


def wkv7_torch(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None,
    output_final_state: bool = False, cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = S_t^T (scale r_t).

    r, w, k, v, a, b: [B, T, H, N], w the log decay; initial_state [B or n_seqs, H, K, V].
    Returns o [B, T, H, V] in v's dtype and, if asked, the final state [B or n_seqs, H, K, V]
    in float32 (float64 for float64 inputs). Inputs are assumed valid (kernels.wkv7 checks them).
    """
    dt = compute_dtype(r, w, k, v, a, b)
    layout = ChunkLayout.of(r.shape[1], CHUNK, cu_seqlens)
    chunks = [layout.to_chunks(x.to(dt)) for x in (r, w, k, v, a, b)]
    o, s_T = _chunk_wkv7(chunks[0] * scale, *chunks[1:], layout, layout.start_state(initial_state, r, dt))
    return layout.from_chunks(o).to(v.dtype), (s_T if output_final_state else None)


def wkv7_step_torch(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
    *, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One token: r, w, k, v, a, b [B, H, N], state [B, H, K, V] -> (o [B, H, V] in v's dtype, new state)."""
    dt = compute_dtype(r, w, k, v, a, b, state)
    out_dtype = v.dtype
    r, w, k, v, a, b, S = (x.to(dt) for x in (r, w, k, v, a, b, state))
    sa = torch.einsum("bhk,bhkv->bhv", a, S)                 # a^T S, before the decay
    S = w.exp()[..., None] * S + b[..., None] * sa[..., None, :] + k[..., None] * v[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", scale * r, S)
    return o.to(out_dtype), S
