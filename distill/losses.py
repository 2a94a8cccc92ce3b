"""Distillation losses (DESIGN §3).

Legend: B batch, T time, C model width, V vocabulary, N = B·T tokens.

The logit loss never holds a [B, T, V] tensor of either model: `linear_kl` takes the final hidden
states and the output heads and runs the fused operator of kernels/linear_kl.py (vocabulary blocks
in Triton on the GPU, token chunks in torch elsewhere).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor, nn

from kernels.linear_kl import fused_linear_kl

logger = logging.getLogger(__name__)


def l2_alignment(target: Tensor, pred: Tensor) -> Tensor:
    """Mean over tokens of ||target − pred||_2 / sqrt(d): the non-squared L2 of RADLADS.

    target, pred: [B, T, C]. Computed in float32 whatever the input dtype.
    """
    diff = target.float() - pred.float()
    return diff.norm(dim=-1).mean() / math.sqrt(diff.shape[-1])


@dataclass(frozen=True)
class LinearKLResult:
    """What `linear_kl` returns: the loss to train on and the by-products to log, means over the counted
    tokens (labels != ignore_index). Only `loss` carries a gradient (to h_s and w_s)."""

    loss: Tensor  # kl_weight tau^2 mean divergence + ce_weight mean student CE (CE only when ce_weight != 0)
    kl: Tensor  # tau^2 mean divergence of the chosen kind, as in the loss
    student_nll: Tensor  # mean -log p_student(label) at temperature 1 (exp: perplexity); NaN without labels
    teacher_nll: Tensor  # mean -log p_teacher(label) at temperature 1; NaN without labels
    top1: Tensor  # fraction of tokens where argmax teacher == argmax student
    tokens: Tensor | int  # counted tokens (a device tensor with labels: counting reads nothing back)


def head_weight(head: nn.Linear) -> Tensor:
    """The weight [V, C] of an output head; linear_kl takes heads without bias. A quantized head
    (a torchao tensor subclass: distill-export quantize=...) is dequantized to the matrix its own
    weight-only forward multiplies by."""
    if head.bias is not None:
        raise ValueError(f"linear_kl takes output heads without bias, got {head} with a bias")
    weight = head.weight
    return weight if type(weight) in (Tensor, nn.Parameter) else weight.dequantize()


@lru_cache(maxsize=None)
def _warn_teacher_vocab_prefix(v_teacher: int, v_student: int) -> None:
    logger.warning("teacher head has %d rows, the student's %d: the KL uses the teacher's first %d "
                   "(padded vocabulary rows beyond the tokenizer)", v_teacher, v_student, v_student)


def _shared_vocab(w_t: Tensor, v_student: int) -> Tensor:
    """w_t's first v_student rows: a teacher head padded past the tokenizer (e.g. 152064 rows for a
    151936-entry student head) shares the student's vocabulary as its prefix."""
    if w_t.shape[0] < v_student:
        raise ValueError(f"teacher head has {w_t.shape[0]} rows, fewer than the student's {v_student}: the two "
                         f"models must share the student's vocabulary")
    if w_t.shape[0] > v_student:
        _warn_teacher_vocab_prefix(w_t.shape[0], v_student)
    return w_t[:v_student]


def linear_kl(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, *, temperature: float = 1.0, kind: str = "forward",
    beta: float = 0.5, labels: Tensor | None = None, ce_weight: float = 0.0, ignore_index: int = -100,
    kl_weight: float = 1.0, backend: str = "auto", chunk_tokens: int = 1024,
) -> LinearKLResult:
    """Divergence of student from teacher on next-token distributions, from final hidden states and heads.

    h_s: [N, C_s] or [B, T, C_s] student hidden states after its final norm; w_s: [V, C_s] its head.
    h_t, w_t: the teacher's ([.., C_t], [V_t, C_t], V_t >= V: a longer, padded head is cut to w_t[:V]).
    labels: [N] or [B, T] next tokens; tokens labelled ignore_index do not count (None: all count).
    kind: "forward" KL(p_t || p_s); "reverse" KL(p_s || p_t); "jsd" the generalized Jensen-Shannon
    beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, 0 < beta < 1 -- the
    convention of Liger-Kernel's LigerFusedLinearJSD(jsd_beta=beta) (teacher = its target P), which
    however turns beta = 0 / 1 into forward / reverse KL. p = softmax(logits / temperature) for both
    models; the divergence is scaled by temperature^2. loss = kl_weight (scaled divergence) + ce_weight
    (student CE); the student NLL/CE and teacher NLL use temperature 1; the CE term and its gradient
    exist only when ce_weight != 0 (kl_weight = 0, ce_weight > 0: language-model training alone).
    No [N, V] tensor is materialized (kernels/NOTES_linear_kl.md); backend: "auto" | "triton" | "torch",
    chunk_tokens the torch backend's token chunk.
    """
    w_t = _shared_vocab(w_t, w_s.shape[0])
    h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])  # [N, C]
    if labels is not None:
        labels = labels.reshape(-1)
        if labels.shape[0] != h_s.shape[0]:
            raise ValueError(f"labels hold {labels.shape[0]} tokens, the hidden states {h_s.shape[0]}")
    if h_s.shape[0] == 0:
        raise ValueError("linear_kl got no tokens")
    loss, sums = fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=temperature, kind=kind, beta=beta,
                                 ce_weight=ce_weight, kl_weight=kl_weight, ignore_index=ignore_index, backend=backend,
                                 chunk_tokens=chunk_tokens)
    tokens = h_s.shape[0] if labels is None else (labels != ignore_index).sum()
    kl, student_nll, teacher_nll, top1 = (sums / (tokens.clamp_min(1) if labels is not None else tokens)).unbind()
    return LinearKLResult(loss=loss, kl=kl, student_nll=student_nll, teacher_nll=teacher_nll, top1=top1,
                          tokens=tokens)
