"""How the chunk walks of a WKV op are laid out over programs (shared by WKV-6 and WKV-7).

Each program walks the chunks of one (sequence, head) and BV state columns in order. Long sequences
with few heads would leave most of the GPU idle, so they are cut into segments that run in parallel:
a segment's end state is affine in its start state, S_end = M S_start + D, and a short serial scan
over the (M, D) of each sequence's segments gives every segment's start state (kernels/NOTES.md).
`walk_forward` / `walk_backward` run an op's kernels either way; the op supplies the launches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.wkv_triton_common import block_v, chunk_layout, dot_precision, load_chunk, state_ptr, store_chunk

SEGMENT_BELOW = 0.5  # segment when the (sequence, head, value block) programs are fewer than this x SMs
# Cut into about this many x SMs programs. A backward program holds a whole SM (kernels/NOTES.md), so
# ~4 waves lose at most a quarter of a wave's time to a part-filled last one; fewer segments than 8 x SMs
# mean half the scan steps, and measured 2-4 % faster at both segmented benchmark shapes (H200, NOTES v3.9).
SEGMENT_PROGRAMS_PER_SM = 4
MIN_SEGMENT_CHUNKS = 8  # shorter segments add scan steps and launches for little parallelism
SEGMENT_CHUNKS: int | None = None  # fixed segment length in chunks (tests); None: chosen per call


@dataclass(frozen=True)
class Segments:
    """Sequences cut into segments, each run as a packed sequence of its own."""

    cu: Tensor  # [n + 1] int32 token offsets (flattened B*T axis) of the segments
    first: Tensor  # [n_seq + 1] int32 index of each sequence's first segment
    chunk_offsets: Tensor  # [n + 1] int32 index of each segment's first chunk
    n: int
    n_chunks: int
    max_chunks: int  # chunks of the longest segment


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter: never cut)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def segment_chunks(T: int, n_seq: int, packed: bool, H: int, NV: int, BT: int, device: torch.device) -> int | None:
    """Chunks per segment when the (sequence, head, value block) programs cannot fill the device, else None."""
    if SEGMENT_CHUNKS is not None:
        return SEGMENT_CHUNKS
    sms = sm_count(device)
    programs = n_seq * H * NV
    if sms is None or programs >= SEGMENT_BELOW * sms:
        return None
    pieces = max(1, SEGMENT_PROGRAMS_PER_SM * sms // programs)
    chunks_per_seq = math.ceil(T / BT / (n_seq if packed else 1))
    return max(MIN_SEGMENT_CHUNKS, math.ceil(chunks_per_seq / pieces))


def plan_segments(T: int, n_seq: int, cu_seqlens: Tensor | None, H: int, NV: int, BT: int,
                  device: torch.device) -> Segments | None:
    """Segments when the (sequence, head, value block) programs cannot fill the device, else None."""
    seg_chunks = segment_chunks(T, n_seq, cu_seqlens is not None, H, NV, BT, device)
    if seg_chunks is None:
        return None
    if cu_seqlens is None:
        bounds = tuple(i * T for i in range(n_seq + 1))
    else:
        bounds = tuple(cu_seqlens.tolist())
    return _cut(bounds, seg_chunks, BT, device)


@functools.lru_cache(maxsize=64)
def _cut(bounds: tuple[int, ...], seg_chunks: int, BT: int, device: torch.device) -> Segments:
    """The segments of sequences [bounds[i], bounds[i+1]), laid out on the host and copied to the
    device once per layout: a copy per call would stall the launch queue each step. Equal-length
    sequences need no read-back at all; packed ones cost one (cu_seqlens) in plan_segments."""
    cu, first, chunk_offsets = [], [0], [0]
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        starts = list(range(bos, max(eos, bos + 1), seg_chunks * BT))  # an empty sequence keeps one segment
        for start, end in zip(starts, starts[1:] + [eos]):
            chunk_offsets.append(chunk_offsets[-1] + math.ceil(max(end - start, 0) / BT))
        cu += starts
        first.append(len(cu))
    cu.append(bounds[-1])
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return Segments(as_tensor(cu), as_tensor(first), as_tensor(chunk_offsets), len(cu) - 1, chunk_offsets[-1],
                    max(b - a for a, b in zip(chunk_offsets, chunk_offsets[1:])))


@triton.jit
def segment_scan_kernel(dm, e, s0, out, s_last, seg_first, H: tl.constexpr, K: tl.constexpr, BV: tl.constexpr,
                        REVERSE: tl.constexpr, USE_S0: tl.constexpr):
    """Walk one sequence's segments for one head and BV state columns.

    dm [n_seg, H, K, 2K] holds each segment's map S_end = M S_start + D as [D | M]. Forward:
    out[j] = state at the start of segment j, s_last = state at the sequence end. REVERSE (cotangents):
    out[j] = dS at the end of segment j, dS_start(j) = M_j^T dS_end(j) + e[j], s_last = dS at the
    sequence start; s0 is the final state (forward) or its cotangent (reverse)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    j0, j1 = tl.load(seg_first + i_n), tl.load(seg_first + i_n + 1)
    o_k = tl.arange(0, K)
    o_c = i_v * BV + tl.arange(0, BV)
    b_s = tl.zeros([K, BV], dtype=tl.float32)
    if USE_S0:
        b_s = tl.load(state_ptr(s0, i_nh, i_v, K, K, BV))
    for jj in range(j1 - j0):
        j = (j1 - 1 - jj) if REVERSE else (j0 + jj)
        j_h = j.to(tl.int64) * H + i_h
        tl.store(state_ptr(out, j_h, i_v, K, K, BV), b_s)
        p_dm = dm + j_h * K * 2 * K
        if REVERSE:
            b_m = tl.load(p_dm + o_k[None, :] * 2 * K + K + o_k[:, None])  # M^T
            b_off = tl.load(state_ptr(e, j_h, i_v, K, K, BV))
        else:
            b_m = tl.load(p_dm + o_k[:, None] * 2 * K + K + o_k[None, :])
            b_off = tl.load(p_dm + o_k[:, None] * 2 * K + o_c[None, :])
        # tf32x3 (three tensor-core products) keeps ~fp32 accuracy; an IEEE fp32 dot of this size
        # compiled to 32 registers and a 7 KB spill stack (benchmarks/wkv_resources.py, kernels/NOTES.md)
        b_s = tl.dot(b_m, b_s, input_precision="tf32x3") + b_off
    tl.store(state_ptr(s_last, i_nh, i_v, K, K, BV), b_s)


def scan_segments(dm: Tensor, seg: Segments, n_seq: int, s0: Tensor | None,
                  e: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward (e None): (start state of every segment, final state of every sequence). Reverse
    (e = dS at each segment start when its end has none): (dS at every segment end, dS at every
    sequence start). s0: initial state, or the final state's cotangent, [n_seq, H, K, K]; None = 0."""
    _, H, K, _ = dm.shape
    BV = block_v(K)
    out = dm.new_empty(seg.n, H, K, K)
    s_last = dm.new_empty(n_seq, H, K, K)
    segment_scan_kernel[(K // BV, n_seq * H)](dm, e, s0, out, s_last, seg.first, H=H, K=K, BV=BV,
                                              REVERSE=e is not None, USE_S0=s0 is not None)
    return out, s_last


OUTPUT_ROWS = 64  # tokens per program of segment_output_kernel: S_start is read once per this many rows


@triton.jit
def segment_output_kernel(part, s_start, o, seg_cu, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          ROWS: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """o = local + Q S_start for row block i_c (ROWS tokens) of one segment, one head and BV value columns.
    part [*, H, V + K] fp32 holds a transition pass's outputs: the segment-local ones (from S = 0) and Q
    (from S = I, v = 0), whose row t is r_t^T Phi_t, Phi_t the segment's transition up to t; so no
    second walk is needed."""
    i_c, i_nh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seg_cu + i_n).to(tl.int64)
    eos = tl.load(seg_cu + i_n + 1).to(tl.int64)
    if bos + i_c * ROWS < eos:
        b_local = load_chunk(part, bos, eos, i_h, i_c, i_v, H, V + K, ROWS, BV)  # [ROWS, BV]
        b_q = load_chunk(part, bos, eos, i_h, i_c, V // K, H, V + K, ROWS, K)  # [ROWS, K], columns V.. (V = K)
        b_s = tl.load(state_ptr(s_start, i_nh, i_v, K, V, BV))  # [K, BV]
        b_o = b_local + tl.dot(b_q, b_s, input_precision=PREC)
        store_chunk(o, b_o, bos, eos, i_h, i_c, i_v, H, V, ROWS, BV)


class Saved(NamedTuple):
    """What the forward walk keeps for the backward."""

    hs: Tensor | None  # [n_chunks, H, K, V] fp32 state at each chunk start
    chunk_offsets: Tensor | None  # first chunk of each walked row (sequence or segment); None: not packed
    seg: Segments | None
    dm: Tensor | None  # [n_seg, H, K, 2K] each segment's [D | M]


# launch(o, h0, ht, hs, cu_seqlens, chunk_offsets, grid, transition): the op's forward kernel, where
# transition asks for the segment maps [D | M] in ht instead of outputs
ForwardLaunch = Callable[..., None]
# launch(dht, dh0, cu_seqlens, chunk_offsets, grid): the op's backward kernel (stores dh0 if given);
# state_walk(ds_start, cu_seqlens, chunk_offsets, grid): its dS-only walk from dS_end = 0
BackwardLaunch = Callable[..., None]


def walk_forward(launch: ForwardLaunch, x: Tensor, initial_state: Tensor | None, output_final_state: bool,
                 cu_seqlens: Tensor | None, save: bool, BT: int) -> tuple[Tensor, Tensor | None, Saved]:
    """Run the op's forward over whole sequences, or over segments joined by a scan (then, unless save,
    the outputs come from the transition pass: no second walk). x: the op's v (o takes its shape and
    dtype). Returns o, the final state (if asked) and what the backward needs."""
    B, T, H, N = x.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    NV = N // block_v(N)
    seg = plan_segments(T, n_seq, cu_seqlens, H, NV, BT, x.device)
    dm = None
    if seg is not None:  # every segment's map S_end = M S_start + D, then the start states by a scan
        dm = x.new_empty(seg.n, H, N, 2 * N, dtype=torch.float32)
        # with no backward to follow, the same pass writes the outputs as local + Q (segment_output_kernel)
        part = None if save else x.new_empty(B, T, H, 2 * N, dtype=torch.float32)
        launch(part, None, dm, None, seg.cu, seg.chunk_offsets, (2 * NV, seg.n * H), True)
        initial_state, ht = scan_segments(dm, seg, n_seq, initial_state)
        if not save:
            o = x.new_empty(B, T, H, N)
            segment_output_kernel[(triton.cdiv(seg.max_chunks * BT, OUTPUT_ROWS), seg.n * H, NV)](
                part, initial_state, o, seg.cu, H=H, K=N, V=N, ROWS=OUTPUT_ROWS, BV=block_v(N),
                PREC=dot_precision(x.dtype))
            return o, (ht if output_final_state else None), Saved(None, None, seg, dm)
        cu_seqlens, n_seq, chunk_offsets, n_chunks = seg.cu, seg.n, seg.chunk_offsets, seg.n_chunks
    else:
        ht = x.new_empty(n_seq, H, N, N, dtype=torch.float32) if output_final_state else None
        chunk_offsets, n_chunks = chunk_layout(T, n_seq, cu_seqlens, BT)
    o = x.new_empty(B, T, H, N)
    hs = x.new_empty(n_chunks, H, N, N, dtype=torch.float32) if save else None
    launch(o, initial_state, ht if seg is None else None, hs, cu_seqlens, chunk_offsets, (NV, n_seq * H), False)
    return o, (ht if output_final_state else None), Saved(hs, chunk_offsets, seg, dm)


def walk_backward(launch: BackwardLaunch, state_walk: BackwardLaunch, x: Tensor, dht: Tensor | None, saved: Saved,
                  cu_seqlens: Tensor | None, want_dh0: bool) -> Tensor | None:
    """Run the op's backward over whole sequences, or over segments from their end cotangents (each
    segment's own dS walk, then a reverse scan). Returns the initial state's gradient if wanted."""
    B, _, H, N = x.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    NV = N // block_v(N)
    seg = saved.seg
    if seg is None:
        dh0 = x.new_empty(n_seq, H, N, N, dtype=torch.float32) if want_dh0 else None
        launch(dht, dh0, cu_seqlens, saved.chunk_offsets, (NV, n_seq * H))
        return dh0
    ds_start = x.new_empty(seg.n, H, N, N, dtype=torch.float32)
    state_walk(ds_start, seg.cu, seg.chunk_offsets, (NV, seg.n * H))
    ds_end, dh0 = scan_segments(saved.dm, seg, n_seq, dht, ds_start)
    launch(ds_end, None, seg.cu, saved.chunk_offsets, (NV, seg.n * H))
    return dh0 if want_dh0 else None
