"""Linear-KL in token chunks with plain torch ops: the CPU backend and the fallback (any device).

Legend: N tokens, C width, V vocabulary, n tokens of one chunk. The math is kernels/NOTES_linear_kl.md's;
this file is its readable statement, and kernels/linear_kl_triton.py computes the same per vocab block.

Each chunk's logits [n, V] are materialized once: the divergence, both NLLs, the top-1 agreement and
the gradient dz = d(loss)/d(student logits) come out of that one pass in closed form, so the forward
leaves dh_s = dz W_s and dW_s = dz^T h_s ready and nothing is recomputed in the backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and weight gradients: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# torch 2.8 gave mm/addmm an out_dtype: half operands, float32 result, on CUDA.
_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _half_to_fp32_gemm(a: Tensor, b: Tensor) -> bool:
    """Whether cuBLAS can multiply these half operands straight into a float32 result."""
    return _MM_OUT_DTYPE and a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)


def matmul_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in accumulate_dtype: half operands on CUDA keep the fp32 accumulator instead of rounding
    the product to bf16 first (logits of 150k-entry vocabularies lose too much in bf16)."""
    out = accumulate_dtype(a.dtype)
    if out == torch.float32 and _half_to_fp32_gemm(a, b):
        return torch.mm(a, b, out_dtype=out)
    return (a @ b).to(out)


def addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, acc float32/64 and a, b possibly half (the weight-gradient sum over token chunks)."""
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and _half_to_fp32_gemm(a, b):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def divergence(logp_t: Tensor, logp_s: Tensor, kind: str, beta: float, need_grad: bool
               ) -> tuple[Tensor, Tensor | None]:
    """Per-token divergence D [n] of log-probabilities [n, V] at one temperature, and dD/dz_s [n, V]
    (z_s the student's tempered logits) when need_grad.

    forward: KL(p_t || p_s)                        dD/dz_s = p_s - p_t
    reverse: KL(p_s || p_t) = sum p_s g,           dD/dz_s = p_s (g - D),           g = log p_s - log p_t
    jsd:     b KL(p_t || m) + (1 - b) KL(p_s || m), m = b p_t + (1 - b) p_s
                                                   dD/dz_s = (1 - b) p_s (log p_s - log m - KL(p_s || m))
    """
    if kind == "forward":
        p_t = logp_t.exp()
        d = (p_t * (logp_t - logp_s)).sum(-1)
        return d, (logp_s.exp() - p_t) if need_grad else None
    p_s = logp_s.exp()
    if kind == "reverse":
        g = logp_s - logp_t
        d = (p_s * g).sum(-1)
        return d, (p_s * (g - d[:, None])) if need_grad else None
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    kl_tm = (logp_t.exp() * (logp_t - log_m)).sum(-1)
    kl_sm = (p_s * (logp_s - log_m)).sum(-1)
    d = beta * kl_tm + (1 - beta) * kl_sm
    return d, ((1 - beta) * p_s * (logp_s - log_m - kl_sm[:, None])) if need_grad else None


def chunk_terms(x_t: Tensor, x_s: Tensor, labels: Tensor | None, *, temperature: float, kind: str,
                beta: float, ce_weight: float, need_grad: bool, weight: Tensor | None = None,
                kl_weight: float = 1.0,
                ignore_index: int = -100) -> tuple[Tensor, Tensor | None]:
    """Sums over one chunk's counted tokens of [tau^2 D, student NLL, teacher NLL, top-1 agreement] ([4];
    the NLLs NaN without labels), and dz = d(sum of kl_weight tau^2 D + ce_weight CE)/d x_s [n, V] when need_grad
    (rows of uncounted tokens included: the caller scales rows by weight).

    x_t, x_s: [n, V] logits before the temperature; labels: [n] or None (ignore_index: not counted);
    weight: [n] 1 for counted tokens, 0 else (None: all count). NLLs and CE are at temperature 1.
    """
    tau = temperature
    logp_t = F.log_softmax(x_t / tau, -1)
    logp_s = F.log_softmax(x_s / tau, -1)
    d, dd = divergence(logp_t, logp_s, kind, beta, need_grad)
    agree = (x_t.argmax(-1) == x_s.argmax(-1)).to(x_s.dtype)
    if weight is not None:
        d, agree = d * weight, agree * weight
    if labels is None:
        nll_s = nll_t = x_s.new_tensor(math.nan)
    else:
        nll_s = F.cross_entropy(x_s, labels, reduction="sum", ignore_index=ignore_index)
        nll_t = F.cross_entropy(x_t, labels, reduction="sum", ignore_index=ignore_index)
    sums = torch.stack([tau**2 * d.sum(), nll_s, nll_t, agree.sum()])
    if not need_grad:
        return sums, None
    dz = dd.mul_(kl_weight * tau)  # tau^2 D(x / tau): the chain rule's 1/tau leaves one tau
    if ce_weight != 0:
        onehot = F.one_hot(labels.clamp_min(0), x_s.shape[-1]).to(x_s.dtype)  # ignored rows are scaled to 0
        dz.add_(F.softmax(x_s, -1).sub_(onehot), alpha=ce_weight)
    return sums, dz


def linear_kl_torch(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, *,
    temperature: float, kind: str, beta: float, ce_weight: float, need_dh: bool, need_dw: bool,
    row_scale: Tensor | None = None, ignore_index: int = -100, chunk_tokens: int = 1024, kl_weight: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(sums [4], dh_s [N, C_s] | None, dW_s [V, C_s] | None) of the mean loss over the counted tokens.

    h_s [N, C_s], w_s [V, C_s], h_t [N, C_t], w_t [V, C_t] in their matmul dtypes; labels [N] or None.
    row_scale [N]: each token's share of the mean (weight / count; None: 1 / N). sums as chunk_terms's;
    dh_s in h_s's dtype, dW_s in accumulate_dtype.
    """
    N = h_s.shape[0]
    sums = h_s.new_zeros(4, dtype=accumulate_dtype(h_s.dtype))
    need_grad = need_dh or need_dw
    dh = torch.empty_like(h_s) if need_dh else None
    dw = torch.zeros_like(w_s, dtype=accumulate_dtype(w_s.dtype)) if need_dw else None
    for start in range(0, N, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        x_t = matmul_acc(h_t[rows], w_t.t())  # [n, V]
        x_s = matmul_acc(h_s[rows], w_s.t())
        scale = None if row_scale is None else row_scale[rows]
        part, dz = chunk_terms(x_t, x_s, None if labels is None else labels[rows], temperature=temperature,
                               kind=kind, beta=beta, ce_weight=ce_weight, kl_weight=kl_weight, need_grad=need_grad,
                               weight=None if scale is None else (scale > 0).to(x_s.dtype), ignore_index=ignore_index)
        sums += part
        if dz is not None:  # the loss is the mean over the counted tokens
            dz = (dz.div_(N) if scale is None else dz.mul_(scale[:, None].to(dz.dtype))).to(h_s.dtype)
            if need_dh:
                dh[rows] = dz @ w_s
            if need_dw:
                addmm_acc(dw, dz.t(), h_s[rows])
    return sums, dh, dw
