"""Distillation losses (DESIGN §3).

Legend: B batch, T time, C model width, V vocabulary, N = B·T tokens.

The logit losses never hold a [B, T, V] tensor of either model: tokens are processed in
chunks, and each chunk's student log-probabilities are recomputed in the backward pass
(activation checkpointing), so peak memory is one chunk's [chunk, V] logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def l2_alignment(target: Tensor, pred: Tensor) -> Tensor:
    """Mean over tokens of ||target − pred||_2 / sqrt(d): the non-squared L2 of RADLADS.

    target, pred: [B, T, C]. Computed in float32 whatever the input dtype.
    """
    diff = target.float() - pred.float()
    return diff.norm(dim=-1).mean() / math.sqrt(diff.shape[-1])


@dataclass
class LogitStats:
    """Sums over the counted tokens of one batch (divide by `tokens` for means)."""

    kl: Tensor  # Σ KL(p_teacher || p_student) at temperature τ, ×τ²
    student_nll: Tensor  # Σ −log p_student(label)
    teacher_nll: Tensor  # Σ −log p_teacher(label)   (no gradient)
    top1_agree: Tensor  # Σ [argmax teacher == argmax student]   (no gradient)
    tokens: int


def _chunk_stats(
    h_teacher: Tensor, h_student: Tensor, labels: Tensor,
    w_teacher: Tensor, w_student: Tensor, temperature: float,
) -> Tensor:
    """[4] sums for one chunk: kl, student nll, teacher nll, top-1 agreement."""
    with torch.no_grad():
        logits_t = F.linear(h_teacher, w_teacher).float()  # [n, V]
        logp_t = F.log_softmax(logits_t / temperature, dim=-1)
        nll_t = F.cross_entropy(logits_t, labels, reduction="sum")
    logits_s = F.linear(h_student, w_student).float()  # [n, V]
    logp_s = F.log_softmax(logits_s / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum() * temperature**2
    nll_s = F.cross_entropy(logits_s, labels, reduction="sum")
    agree = (logits_t.argmax(-1) == logits_s.detach().argmax(-1)).sum().float()
    return torch.stack([kl, nll_s, nll_t.detach(), agree])


def logit_stats(
    h_teacher: Tensor, head_teacher: nn.Linear,
    h_student: Tensor, head_student: nn.Linear,
    labels: Tensor, *, temperature: float = 1.0, chunk_tokens: int = 1024,
    ignore_index: int = -100,
) -> LogitStats:
    """KL, NLLs and agreement from final hidden states and the two output heads.

    h_teacher, h_student: [B, T, C] (after each model's final norm); labels: [B, T] next
    tokens, `ignore_index` marks tokens that do not count (padding).
    """
    keep = labels.reshape(-1) != ignore_index
    h_t = h_teacher.reshape(-1, h_teacher.shape[-1])[keep]  # [N, C]
    h_s = h_student.reshape(-1, h_student.shape[-1])[keep]  # [N, C]
    y = labels.reshape(-1)[keep]  # [N]
    if y.numel() == 0:
        raise ValueError("logit_stats got a batch with no counted tokens (every label is ignore_index)")
    # The teacher head may be bf16 while the student trains in fp32: each side keeps its own dtype.
    h_t = h_t.to(head_teacher.weight.dtype)
    sums = h_s.new_zeros(4, dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (h_t[part], h_s[part], y[part], head_teacher.weight, head_student.weight, temperature)
        if torch.is_grad_enabled() and h_s.requires_grad:
            sums = sums + checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_stats(*args)
    kl, nll_s, nll_t, agree = sums.unbind()
    return LogitStats(kl=kl, student_nll=nll_s, teacher_nll=nll_t, top1_agree=agree, tokens=y.numel())
