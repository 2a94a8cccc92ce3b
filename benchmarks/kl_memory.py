"""Peak memory and speed of the kl stage's logit loss (issue 12), forward+backward, one GPU.

A Qwen2.5-0.5B-shaped pair: V = 151936, C = 896, N tokens (default 16384 and 32768). Inputs as the
training step has them: bf16 hidden states of both models, the teacher head bf16, the student head an
fp32 master weight, everything under bf16 autocast (so the head matmuls run in bf16). For each method,
the peak of torch.cuda.max_memory_allocated above what was allocated before the call, and the median
time of one forward+backward:

    naive           full [N, V] logits of both models in torch, forward KL
    chunked         logit_stats as of c538c71 (copied below, the 'before' anchor), forward KL with the
                    step's `+ 0.0 * ce` term (the CE and its backward ran even at ce_weight 0)
    linear_kl       distill.losses.linear_kl, backend triton, kind forward (one row per --variants entry)
    linear_kl_torch the same on the torch backend (the CPU path and fallback), chunk 1024 tokens
    liger_jsd       liger-kernel's LigerFusedLinearJSD(jsd_beta=--beta), if installed (else skipped)
    linear_kl_jsd   linear_kl, backend triton, kind jsd, beta --beta: the same loss as liger_jsd

    python benchmarks/kl_memory.py --out kl_memory.json [--tokens 16384,32768] [--beta 0.5]
        [--variants default,bv64_s4] [--reps 5]

Run from the repository root with PYTHONPATH=. . Prints the compiled kernels' registers / spills / shared
memory, then a table (ratios vs naive memory and vs chunked time); writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import kernels.linear_kl_triton as triton_mod
from distill.losses import linear_kl
from wkv import write_with_resources  # benchmarks/ is sys.path[0] when this file runs as a script

V, C = 151936, 896
# linear_kl's launch shapes tried by --variants (kernels.linear_kl_triton.Blocks fields over the default)
VARIANTS = {
    "default": {},
    "bv64_s4": dict(v=64, stages=4),   # smaller logit tiles, deeper pipeline
    "bn64_w4": dict(n=64, warps=4, stages=4),
    "s2": dict(stages=2),
    "w16": dict(warps=16),
    "g8": dict(group_n=8),
    "split4k": dict(split_v=4096),
}


# ----- the 'before' anchor: distill/losses.py's logit_stats at c538c71, unchanged --------------------
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
# ----- end of the anchor ------------------------------------------------------------------------------


def make_inputs(N: int, seed: int = 0) -> dict:
    """Leaves as the step sees them; logits of std ~3, the student head the teacher's plus noise."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
    w_t = rnd(V, C) * (3 / math.sqrt(C))
    return {"h_s": rnd(N, C).bfloat16().requires_grad_(), "w_s": (w_t + 0.5 * w_t.std() * rnd(V, C)).requires_grad_(),
            "h_t": rnd(N, C).bfloat16(), "w_t": w_t.bfloat16(), "labels": torch.randint(0, V, (N,), device="cuda")}


def naive(x: dict) -> Tensor:
    with torch.no_grad():
        logp_t = F.log_softmax(F.linear(x["h_t"], x["w_t"]).float(), -1)
    logp_s = F.log_softmax(F.linear(x["h_s"], x["w_s"]).float(), -1)
    return F.kl_div(logp_s, logp_t, reduction="batchmean", log_target=True)


def chunked(x: dict) -> Tensor:
    head_t, head_s = SimpleNamespace(weight=x["w_t"]), SimpleNamespace(weight=x["w_s"])  # logit_stats reads .weight
    stats = logit_stats(x["h_t"], head_t, x["h_s"], head_s, x["labels"])
    kl, ce = stats.kl / stats.tokens, stats.student_nll / stats.tokens
    return 1.0 * kl + 0.0 * ce  # stage_loss at c538c71 with kl_weight 1, ce_weight 0


def ours(kind: str, backend: str, beta: float = 0.5):
    def loss(x: dict) -> Tensor:
        return linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], labels=x["labels"], kind=kind, beta=beta,
                         backend=backend).loss
    return loss


def liger(beta: float):
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except ImportError as err:
        return f"skipped: liger-kernel not importable ({err})"
    fn = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)
    return lambda x: fn(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"])


def step(fn, x: dict) -> float:
    """One forward+backward under bf16 autocast, gradients cleared first; returns the loss."""
    x["h_s"].grad = x["w_s"].grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(x)
    loss.backward()
    return loss.item()


def measure(fn, x: dict, reps: int) -> dict:
    """Peak bytes above the inputs and median ms of `step`, after one warm-up step (compilation)."""
    step(fn, x)
    x["h_s"].grad = x["w_s"].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step(fn, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x["h_s"].grad = x["w_s"].grad = None
        start.record()
        step(fn, x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"peak_GiB": peak / 2**30, "median_ms": statistics.median(times), "times_ms": times, "loss": loss}


def methods(variants: list[str], beta: float) -> list[tuple[str, dict | None, object]]:
    """(row name, Blocks override or None, loss fn or a skip reason) in the order they run."""
    rows = [("naive", None, naive), ("chunked", None, chunked)]
    rows += [(f"linear_kl[{v}]" if v != "default" else "linear_kl", VARIANTS[v], ours("forward", "triton"))
             for v in variants]
    rows += [("linear_kl_torch", None, ours("forward", "torch")), (f"liger_jsd(beta={beta})", None, liger(beta)),
             (f"linear_kl_jsd(beta={beta})", {}, ours("jsd", "triton", beta))]
    return rows


def table(out: dict) -> str:
    lines = [f"{out['device']}, torch {out['torch']}, triton {out['triton']}, V={V}, C={C}, bf16 autocast",
             f"{'method':28s} {'tokens':>6s} {'peak GiB':>9s} {'x naive':>8s} {'ms':>8s} {'chunked/x':>9s} {'loss':>9s}"]
    for N, res in out["results"].items():
        naive_mem = res.get("naive", {}).get("peak_GiB")
        chunked_ms = res.get("chunked", {}).get("median_ms")
        for name, r in res.items():
            if "skipped" in r or "failed" in r:
                lines.append(f"{name:28s} {N:>6s}  {r.get('skipped') or r.get('failed')}")
                continue
            mem_ratio = f"{r['peak_GiB'] / naive_mem:8.3f}" if naive_mem else f"{'-':>8s}"
            speedup = f"{chunked_ms / r['median_ms']:9.2f}" if chunked_ms else f"{'-':>9s}"
            lines.append(f"{name:28s} {N:>6s} {r['peak_GiB']:9.2f} {mem_ratio} {r['median_ms']:8.1f} {speedup} "
                         f"{r['loss']:9.5f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kl_memory.json")
    parser.add_argument("--tokens", default="16384,32768")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--variants", default="default", help=f"linear_kl launch shapes: {sorted(VARIANTS)}")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"--variants: unknown {name!r}; valid: {sorted(VARIANTS)}")
    default_blocks = triton_mod.GPU_BLOCKS
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "triton": triton.__version__, "V": V, "C": C, "beta": args.beta,
           "blocks_default": vars(default_blocks), "results": {}}
    t_start = time.time()
    for N in (int(n) for n in args.tokens.split(",")):
        res = out["results"].setdefault(str(N), {})
        x = make_inputs(N)
        for name, blocks, fn in methods(variants, args.beta):
            if isinstance(fn, str):
                res[name] = {"skipped": fn}
                continue
            triton_mod.GPU_BLOCKS = replace(default_blocks, **blocks) if blocks else default_blocks
            t0 = time.time()
            try:  # one failing row (out of memory, a liger API change) must not lose the others
                res[name] = measure(fn, x, args.reps)
            except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError, TypeError) as err:
                res[name] = {"failed": f"{type(err).__name__}: {str(err)[:160]}"}
            finally:
                triton_mod.GPU_BLOCKS = default_blocks
                x["h_s"].grad = x["w_s"].grad = None
                torch.cuda.empty_cache()
            print(f"{time.time() - t_start:6.0f}s N={N} {name}: {res[name]} ({time.time() - t0:.0f} s)", flush=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        del x
        torch.cuda.empty_cache()
    write_with_resources(out, args.out, {triton_mod: ("_stats_kernel", "_jsd_kernel", "_dz_kernel")},
                         int_flags=("KIND", "BLOCK_N", "BLOCK_V", "SPLIT_V", "GROUP_N"))
    print(table(out))


if __name__ == "__main__":
    main()
