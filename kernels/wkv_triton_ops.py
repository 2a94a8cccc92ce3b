"""The chunked Triton WKV ops as torch.library custom ops (shared by WKV-6 and WKV-7).

A custom op is opaque to torch.compile: a compiled student block keeps the WKV call in its graph
(no graph break) without dynamo tracing into the host-side launch planning (segments, chunk
layout), and autograd reaches the op's backward through register_autograd.

Each op is a pair: <name>_fwd(operands..., initial_state?, cu_seqlens?, scale, output_final_state,
save) -> (o, ht, hs, dm) and <name>_bwd(operands..., do, dht?, hs, dm, cu_seqlens?, scale, want_dh0)
-> (operand grads..., dh0). Absent tensors travel as empty ones (a custom op returns tensors only);
the walk's host-side layout (Segments) is planned again for the backward from the shapes: it is a
cached, deterministic function of them (kernels/wkv_triton_walk.py::plan_segments).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import triton
from torch import Tensor

from kernels.wkv_triton_common import block_v, chunk_layout
from kernels.wkv_triton_walk import Saved, plan_segments, segment_chunks

# One namespace per copy of this package: an exported model folder carries its own copy (distill-export),
# which may be loaded beside ours in one process, and an op name registers only once.
NAMESPACE = "rwkv_distill_" + re.sub(r"\W", "_", __name__.rpartition(".")[0] or "kernels")


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32) if x is None else x


def _or_none(x: Tensor) -> Tensor | None:
    return None if x.numel() == 0 else x


def saved_walk(hs: Tensor, dm: Tensor, x: Tensor, cu_seqlens: Tensor | None, BT: int) -> Saved:
    """What the forward walk kept, with its layout planned again from the shapes. x: the op's v."""
    B, T, H, N = x.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    seg = plan_segments(T, n_seq, cu_seqlens, H, N // block_v(N), BT, x.device)
    if seg is not None:
        return Saved(hs, seg.chunk_offsets, seg, dm)
    return Saved(hs, chunk_layout(T, n_seq, cu_seqlens, BT)[0], None, None)


def _fake_walk(x: Tensor, cu_seqlens: Tensor | None, output_final_state: bool, save: bool, BT: int):
    """Shapes of (o, ht, hs, dm) without running anything (torch.compile's fake tensors)."""
    B, T, H, N = x.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    empty = x.new_empty(0, dtype=torch.float32)
    ht = x.new_empty(n_seq, H, N, N, dtype=torch.float32) if output_final_state else empty
    if not save:
        return torch.empty_like(x), ht, empty, empty
    if cu_seqlens is not None:  # packed: how many chunks and segments depends on the offsets' values
        ctx = torch.library.get_ctx()
        n_chunks, n_segments = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return (torch.empty_like(x), ht, x.new_empty(n_chunks, H, N, N, dtype=torch.float32),
                x.new_empty(n_segments, H, N, 2 * N, dtype=torch.float32))
    # equal-length sequences: the plan's sizes by arithmetic, not by laying it out (plan_segments caches
    # the layout's device tensors, which must not be fake ones)
    seg_chunks = segment_chunks(T, n_seq, False, H, N // block_v(N), BT, x.device)
    hs = x.new_empty(n_seq * triton.cdiv(T, BT), H, N, N, dtype=torch.float32)  # segments cut at chunk bounds
    if seg_chunks is None:
        return torch.empty_like(x), ht, hs, empty
    n_segments = n_seq * max(1, triton.cdiv(T, seg_chunks * BT))
    return torch.empty_like(x), ht, hs, x.new_empty(n_segments, H, N, 2 * N, dtype=torch.float32)


def wkv_op(name: str, operands: tuple[str, ...], fwd: Callable, bwd: Callable, BT: int) -> Callable:
    """Register <name>_fwd / <name>_bwd for an op with these operand names ("v" among them) and
    return a function (operands..., initial_state, cu_seqlens, scale, output_final_state, save)
    -> (o, ht or None) with autograd. fwd and bwd are the op's launchers:
    fwd(*operands, scale, initial_state, output_final_state, cu_seqlens, save) -> (o, ht, Saved),
    bwd(*operands, do, dht, saved, scale, cu_seqlens, want_dh0) -> (*operand grads, dh0)."""
    n, iv = len(operands), operands.index("v")
    tensors = ", ".join(f"Tensor {o}" for o in operands)
    fwd_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_fwd", mutates_args=(),
        schema=f"({tensors}, Tensor? initial_state, Tensor? cu_seqlens, float scale, bool output_final_state, "
               "bool save) -> (Tensor, Tensor, Tensor, Tensor)",
    )(lambda *args: _run_fwd(fwd, n, *args))
    bwd_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_bwd", mutates_args=(),
        schema=f"({tensors}, Tensor do, Tensor? dht, Tensor hs, Tensor dm, Tensor? cu_seqlens, float scale, "
               f"bool want_dh0) -> ({', '.join(['Tensor'] * (n + 1))})",
    )(lambda *args: _run_bwd(bwd, n, iv, BT, *args))

    @fwd_op.register_fake
    def _(*args):
        xs, (_, cu_seqlens, _, output_final_state, save) = args[:n], args[n:]
        return _fake_walk(xs[iv], cu_seqlens, output_final_state, save, BT)

    @bwd_op.register_fake
    def _(*args):
        xs, want_dh0 = args[:n], args[-1]
        B, _, H, N = xs[0].shape
        cu_seqlens = args[n + 4]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        dh0 = xs[0].new_empty((n_seq, H, N, N) if want_dh0 else (0,), dtype=torch.float32)
        return (*(torch.empty_like(x) for x in xs), dh0)

    def setup_context(ctx, inputs, output):
        xs, (initial_state, cu_seqlens, scale, _, save) = inputs[:n], inputs[n:]
        assert save, f"{name}: a backward needs the forward to save its walk (save=True)"
        _, _, hs, dm = output
        ctx.save_for_backward(*xs, hs, dm, cu_seqlens)
        ctx.scale, ctx.has_h0 = scale, initial_state is not None

    def backward(ctx, do, dht, _dhs, _ddm):
        *xs, hs, dm, cu_seqlens = ctx.saved_tensors
        # no final state asked for: the placeholder output is empty, and autograd hands back an empty
        # gradient for it, which is no dS at the end (read as one, the kernel loads past its end)
        dht = None if dht is None or dht.numel() == 0 else dht.contiguous()
        grads = bwd_op(*xs, do.contiguous(), dht, hs, dm, cu_seqlens, ctx.scale, ctx.has_h0)
        *operand_grads, dh0 = grads
        return (*operand_grads, _or_none(dh0) if ctx.has_h0 else None, None, None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def apply(*args) -> tuple[Tensor, Tensor | None]:
        o, ht, _, _ = fwd_op(*args)
        return o, (ht if args[n + 3] else None)

    return apply


def _run_fwd(fwd: Callable, n: int, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xs, (initial_state, cu_seqlens, scale, output_final_state, save) = args[:n], args[n:]
    o, ht, saved = fwd(*xs, scale, initial_state, output_final_state, cu_seqlens, save)
    hs = saved.hs if save else None
    dm = saved.dm if save else None
    return o, _or_empty(ht, o), _or_empty(hs, o), _or_empty(dm, o)


def _run_bwd(bwd: Callable, n: int, iv: int, BT: int, *args) -> tuple[Tensor, ...]:
    xs, (do, dht, hs, dm, cu_seqlens, scale, want_dh0) = args[:n], args[n:]
    saved = saved_walk(_or_none(hs), _or_none(dm), xs[iv], cu_seqlens, BT)
    *grads, dh0 = bwd(*xs, do, dht, saved, scale, cu_seqlens, want_dh0)
    return (*grads, _or_empty(dh0, do))
