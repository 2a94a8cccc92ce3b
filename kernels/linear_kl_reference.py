"""The linear-KL loss from full [N, V] logits with autograd: the ground truth of the fused backends.

It holds every logit of both models at once, so it serves tests (float64) and the memory anchor of
benchmarks/kl_memory.py, never training. Shapes as kernels.linear_kl.fused_linear_kl.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_kl_reference(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None = None, *,
    temperature: float = 1.0, kind: str = "forward", beta: float = 0.5, ce_weight: float = 0.0,
    kl_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(loss, [kl, student_nll, teacher_nll, top1]) as means over the N tokens; NLLs NaN without labels.

    loss = kl_weight tau^2 mean D + ce_weight mean CE, D the divergence of the tempered distributions
    (forward KL(p_t||p_s), reverse KL(p_s||p_t), jsd beta KL(p_t||m) + (1-beta) KL(p_s||m),
    m = beta p_t + (1-beta) p_s); NLLs and CE at temperature 1.
    """
    x_t, x_s = h_t @ w_t.t(), h_s @ w_s.t()  # [N, V]
    logp_t = F.log_softmax(x_t / temperature, -1)
    logp_s = F.log_softmax(x_s / temperature, -1)
    if kind == "forward":
        d = F.kl_div(logp_s, logp_t, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse":
        d = F.kl_div(logp_t, logp_s, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1 - beta)]), 0)
        kl_tm = F.kl_div(log_m, logp_t, reduction="none", log_target=True).sum(-1)
        kl_sm = F.kl_div(log_m, logp_s, reduction="none", log_target=True).sum(-1)
        d = beta * kl_tm + (1 - beta) * kl_sm
    kl = temperature**2 * d.mean()
    nan = x_s.new_tensor(math.nan)
    nll_s = nan if labels is None else F.cross_entropy(x_s, labels)
    nll_t = nan if labels is None else F.cross_entropy(x_t, labels)
    top1 = (x_t.argmax(-1) == x_s.argmax(-1)).to(x_s.dtype).mean()
    loss = kl_weight * kl + ce_weight * nll_s if ce_weight else kl_weight * kl
    return loss, torch.stack([kl.detach(), nll_s.detach(), nll_t.detach(), top1])
