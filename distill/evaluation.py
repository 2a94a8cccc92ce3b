"""Teacher-vs-student evaluation on held-out batches, and greedy continuations for a quick look."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import Tensor

from distill.losses import head_weight, linear_kl


@torch.no_grad()
def compare_on_batches(teacher, student, batches: Iterable[dict[str, Tensor]],
                       chunk_tokens: int = 1024) -> dict[str, float]:
    """Held-out metrics over every label token of `batches` ({"input_ids", "labels"}: [B, T]).

    KL is KL(p_teacher || p_student) at temperature 1; top-1 agreement is the fraction of
    positions where both models' most likely next token is the same.
    """
    device = next(student.parameters()).device
    sums = {"kl": 0.0, "student_nll": 0.0, "teacher_nll": 0.0, "top1": 0.0}
    tokens, student_seconds = 0, 0.0
    for batch in batches:
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        teacher_out = teacher(input_ids)
        started = time.perf_counter()
        student_out = student(input_ids)
        student_seconds += time.perf_counter() - started
        out = linear_kl(student_out.last_hidden, head_weight(student.lm_head), teacher_out.last_hidden,
                        head_weight(teacher.lm_head), labels=labels, chunk_tokens=chunk_tokens)
        for key, mean in (("kl", out.kl), ("student_nll", out.student_nll), ("teacher_nll", out.teacher_nll),
                          ("top1", out.top1)):
            sums[key] += mean.item() * out.tokens
        tokens += out.tokens
    if tokens == 0:
        raise ValueError("evaluation got no held-out tokens: the held-out split is empty")
    means = {k: v / tokens for k, v in sums.items()}
    return {
        "teacher_nll": means["teacher_nll"],
        "student_nll": means["student_nll"],
        "teacher_ppl": math.exp(means["teacher_nll"]),
        "student_ppl": math.exp(means["student_nll"]),
        "kl": means["kl"],
        "top1_agreement": means["top1"],
        "eval_tokens": tokens,
        "student_eval_tokens_per_second": tokens / max(student_seconds, 1e-9),
    }


def _cut_at(ids: list[int], stop_ids: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


@torch.no_grad()
def continuations(teacher, student, tokenizer, prompt: str, max_new_tokens: int = 48) -> dict[str, str]:
    """The same prompt continued greedily by teacher (HF generate, KV cache) and student
    (recurrent state, O(1) per token), decoded up to the first end-of-document token."""
    device = next(student.parameters()).device
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    ids = torch.tensor([prompt_ids], device=device)  # [1, T]
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    teacher_ids = teacher.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, pad_token_id=next(iter(stops), 0))
    student_ids = student.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    out = {"prompt": prompt}
    for name, generated in (("teacher", teacher_ids), ("student", student_ids)):
        out[name] = tokenizer.decode(_cut_at(generated[0, ids.shape[1]:].tolist(), stops))
    return out

