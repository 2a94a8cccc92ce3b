"""The fused linear-KL operator: a divergence between two models' next-token distributions computed
from their final hidden states and output heads, never holding a [N, V] logits tensor (DESIGN §3).

backend "torch": token chunks of plain torch (kernels/linear_kl_torch.py, any device). "triton":
vocabulary-block kernels (kernels/linear_kl_triton.py; CUDA, or CPU under TRITON_INTERPRET=1).
"auto": triton for CUDA inputs whose student matmul runs in bf16/fp16, torch otherwise.

Both backends compute the gradient during the forward pass: the loss is the last op of a step and its
gradient needs the same logits the forward needs, so the backward only scales the saved dh_s and dW_s
by the incoming gradient instead of computing every logit a second time.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache, partial
from typing import Callable

import torch
from torch import Tensor

from kernels.linear_kl_torch import accumulate_dtype, linear_kl_torch

KINDS = ("forward", "reverse", "jsd")
BACKENDS = ("auto", "torch", "triton")
HALF = (torch.bfloat16, torch.float16)


def matmul_dtype(h: Tensor, w: Tensor) -> torch.dtype:
    """The dtype h @ w^T runs in: autocast's when autocast is on for h's device, else the wider input's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


@lru_cache(maxsize=None)
def _load_triton() -> Callable | str:
    """kernels.linear_kl_triton.linear_kl_triton, or why it cannot be imported."""
    try:
        return importlib.import_module("kernels.linear_kl_triton").linear_kl_triton
    except ImportError as err:
        return f"kernels.linear_kl_triton does not import ({err})"


def _select(backend: str, device: torch.device, dtypes: tuple[torch.dtype, torch.dtype],
            chunk_tokens: int, ignore_index: int) -> Callable:
    """The backend function for inputs on device whose (student, teacher) matmuls run in dtypes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    torch_fn = partial(linear_kl_torch, chunk_tokens=chunk_tokens, ignore_index=ignore_index)
    if backend == "torch":
        return torch_fn
    if backend == "auto":
        found = _load_triton() if device.type == "cuda" and dtypes[0] in HALF else None
        return found if callable(found) else torch_fn
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA inputs or TRITON_INTERPRET=1, got inputs on {device}; "
                         f"use backend='torch' or 'auto' there")
    if any(dt not in (*HALF, torch.float32) for dt in dtypes):
        raise ValueError(f"backend='triton' takes bfloat16, float16 or float32 matmuls, got {dtypes}; "
                         f"use backend='torch'")
    found = _load_triton()
    if not callable(found):
        raise ValueError(f"backend='triton' is unavailable: {found}; use backend='torch' or 'auto'")
    return found


def _mean_loss(sums: Tensor, tokens: int | Tensor, kl_weight: float, ce_weight: float) -> Tensor:
    """kl_weight tau^2 mean D (+ ce_weight mean CE) from the backend's sums [4] over the counted tokens."""
    total = kl_weight * sums[0] + ce_weight * sums[1] if ce_weight else kl_weight * sums[0]
    return total / (tokens.clamp_min(1) if isinstance(tokens, Tensor) else tokens)


class _FusedLinearKL(torch.autograd.Function):
    """loss, sums = run(need_dh, need_dw)'s; gradients for h_s and w_s only (the teacher is frozen)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, run, weights, count):
        sums, dh, dw = run(ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(None if dh is None else dh.to(h_s.dtype), None if dw is None else dw.to(w_s.dtype))
        ctx.mark_non_differentiable(sums)
        return _mean_loss(sums, count, *weights), sums

    @staticmethod
    def backward(ctx, grad_loss, grad_sums):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_loss, None if dw is None else dw * grad_loss,
                None, None, None, None, None)


def _check(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, temperature: float,
           kind: str, beta: float, kl_weight: float, ce_weight: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"beta={beta} must lie in (0, 1) for kind='jsd' (at 0 or 1 the mixture is one of the "
                         f"two distributions and the divergence is 0); use kind='forward' or 'reverse'")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if h_s.dim() != 2 or h_t.dim() != 2 or h_s.shape[0] != h_t.shape[0] or h_s.shape[0] == 0:
        raise ValueError(f"h_s and h_t must be [N, C] with the same N >= 1, got {tuple(h_s.shape)} and "
                         f"{tuple(h_t.shape)}")
    if w_s.dim() != 2 or w_t.dim() != 2 or w_s.shape != (w_t.shape[0], h_s.shape[1]) or w_t.shape[1] != h_t.shape[1]:
        raise ValueError(f"heads must be w_s [V, C_s], w_t [V, C_t] for h_s {tuple(h_s.shape)}, "
                         f"h_t {tuple(h_t.shape)}; got w_s {tuple(w_s.shape)}, w_t {tuple(w_t.shape)}")
    if labels is not None and labels.shape != (h_s.shape[0],):
        raise ValueError(f"labels must be [N] = [{h_s.shape[0]}], got {tuple(labels.shape)}")
    if kl_weight < 0 or ce_weight < 0 or kl_weight == ce_weight == 0:
        raise ValueError(f"kl_weight={kl_weight}, ce_weight={ce_weight}: both must be >= 0 and one of them > 0")
    if ce_weight != 0 and labels is None:
        raise ValueError(f"ce_weight={ce_weight} needs labels")


def fused_linear_kl(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None = None, *,
    temperature: float = 1.0, kind: str = "forward", beta: float = 0.5, ce_weight: float = 0.0,
    kl_weight: float = 1.0, ignore_index: int = -100, backend: str = "auto", chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """loss = kl_weight tau^2 mean D + ce_weight mean CE over the counted tokens, and sums [4] (no gradient) over
    them of [tau^2 D, student NLL, teacher NLL, top-1 agreement] (NLLs at temperature 1, NaN without
    labels). Tokens labelled ignore_index do not count; they are masked by weights, found without a
    host read-back. A batch with no counted token has loss 0.

    h_s [N, C_s] student final hidden states, w_s [V, C_s] its head; h_t [N, C_t], w_t [V, C_t] the
    teacher's; labels [N] next tokens (all counted) or None. D per kind: forward KL(p_t || p_s), reverse
    KL(p_s || p_t), jsd beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s,
    p = softmax(logits / tau). Gradients flow to h_s and w_s only. chunk_tokens: the torch backend's
    token chunk. The loss and sums are float32 (float64 for float64 inputs).
    """
    _check(h_s, w_s, h_t, w_t, labels, temperature, kind, beta, kl_weight, ce_weight)
    dt_s, dt_t = matmul_dtype(h_s, w_s), matmul_dtype(h_t, w_t)
    fn = _select(backend, h_s.device, (dt_s, dt_t), chunk_tokens, ignore_index)
    count, row_scale = h_s.shape[0], None
    if labels is not None:  # masks by weights, not by indexing: a boolean index would read back its size
        counted = (labels != ignore_index).to(accumulate_dtype(h_s.dtype))
        count = counted.sum()
        row_scale = counted / count.clamp_min(1)

    def run(need_dh: bool, need_dw: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        with torch.autocast(h_s.device.type, enabled=False):
            return fn(h_s.to(dt_s), w_s.to(dt_s), h_t.to(dt_t), w_t.to(dt_t), labels, temperature=temperature,
                      kind=kind, beta=beta, ce_weight=ce_weight, kl_weight=kl_weight, need_dh=need_dh,
                      need_dw=need_dw, row_scale=row_scale)

    if torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad):
        return _FusedLinearKL.apply(h_s, w_s, h_t, w_t, run, (kl_weight, ce_weight), count)
    sums, _, _ = run(False, False)
    return _mean_loss(sums, count, kl_weight, ce_weight), sums
