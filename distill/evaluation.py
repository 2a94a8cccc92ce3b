"""Teacher-vs-student evaluation on held-out batches, and greedy continuations for a quick look."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from distill.losses import logit_stats


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
        stats = logit_stats(teacher_out.last_hidden, teacher.lm_head, student_out.last_hidden,
                            student.lm_head, labels, chunk_tokens=chunk_tokens)
        sums["kl"] += stats.kl.item()
        sums["student_nll"] += stats.student_nll.item()
        sums["teacher_nll"] += stats.teacher_nll.item()
        sums["top1"] += stats.top1_agree.item()
        tokens += stats.tokens
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


@torch.no_grad()
def greedy_continue(next_logits: Callable[[Tensor], Tensor], prompt_ids: list[int], max_new_tokens: int,
                    device: torch.device, stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy decoding by repeated full forwards; `next_logits(ids [1, t]) -> [1, V]`."""
    stop = set(stop_ids)
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(next_logits(ids).argmax(-1))
        if token in stop:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def teacher_next_logits(teacher) -> Callable[[Tensor], Tensor]:
    return lambda ids: teacher.lm_head(teacher(ids).last_hidden[:, -1])


def student_next_logits(student) -> Callable[[Tensor], Tensor]:
    return lambda ids: student.lm_head(student(ids).last_hidden[:, -1])


def continuations(teacher, student, tokenizer, prompt: str, max_new_tokens: int = 48) -> dict[str, str]:
    """The same prompt continued greedily by teacher and student (decoded text)."""
    device = next(student.parameters()).device
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    stops = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None]
    out = {"prompt": prompt}
    for name, fn in (("teacher", teacher_next_logits(teacher)), ("student", student_next_logits(student))):
        out[name] = tokenizer.decode(greedy_continue(fn, prompt_ids, max_new_tokens, device, stops))
    return out
