"""The conversion report of distill-eval: where the student loses against its teacher, what a new
token costs each of them as the context grows, and samples side by side.

Legend: B batch, T time, C model width, V vocabulary, L context length.
Everything is measured here, on the machine distill-eval runs on; report.md ties the JSON and the
PNG plots together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.teacher import FrozenTeacher


def token_nll(hidden: Tensor, head: nn.Linear, labels: Tensor, chunk: int = 256) -> Tensor:
    """-log p(label) at every position: hidden [B, T, C], labels [B, T] -> [B, T] float32 (nan
    where the label is -100); logits are made `chunk` positions at a time, never [B, T, V] whole."""
    out = torch.full(labels.shape, math.nan, device=labels.device)
    for start in range(0, labels.shape[1], chunk):
        part = slice(start, start + chunk)
        logits = head(hidden[:, part].to(head.weight.dtype)).float()  # [B, chunk, V]
        y = labels[:, part]
        nll = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")  # [B, chunk]
        out[:, part] = nll.masked_fill(y == -100, math.nan)
    return out


@torch.no_grad()
def nll_gap_by_position(teacher: FrozenTeacher, student: nn.Module, batches: Iterable[dict[str, Tensor]]
                        ) -> list[float]:
    """Mean over the held-out windows of student NLL - teacher NLL at each position of the window [T]."""
    device = next(student.parameters()).device
    gaps = []
    for batch in batches:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        t = token_nll(teacher(ids).last_hidden, teacher.lm_head, labels)
        s = token_nll(student(ids).last_hidden, student.lm_head, labels)
        gaps.append(s - t)  # [B, T]
    return torch.cat(gaps).nanmean(0).tolist()


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors inside obj (nested lists, dicts, dataclasses, cache objects):
    what a KV cache or a recurrent state holds."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        if obj.data_ptr() in seen:
            return 0
        seen.add(obj.data_ptr())
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_cost(step, prefill, ids: Tensor, steps: int) -> dict[str, float]:
    """Per new token after a context ids [1, L]: seconds (mean of `steps` after one warm-up), the
    bytes of the cache/state it reads, and on CUDA the peak memory of a step.
    prefill(ids) -> (logits [1, V], cache); step(token [1, 1], cache) -> (logits, cache)."""
    device = ids.device
    logits, cache = prefill(ids)
    token = logits.argmax(-1, keepdim=True)
    logits, cache = step(token, cache)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        logits, cache = step(logits.argmax(-1, keepdim=True), cache)
    _sync(device)
    cost = {"seconds_per_token": (time.perf_counter() - started) / steps, "state_bytes": tensor_bytes(cache)}
    if device.type == "cuda":
        cost["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return cost


@torch.no_grad()
def long_context(teacher: FrozenTeacher, student: nn.Module, vocab: int, contexts: list[int],
                 steps: int, seed: int = 0) -> dict[str, Any]:
    """Decode cost per new token at each context length: the teacher with its KV cache (HF), the
    student from its recurrent state. Random tokens: the cost does not depend on what they say."""
    device = next(student.parameters()).device
    hf = teacher.model

    def teacher_prefill(ids):
        out = hf(input_ids=ids, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def teacher_step(token, cache):
        out = hf(input_ids=token, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    def student_prefill(ids):
        out = student(ids)
        return student.lm_head(out.last_hidden[:, -1]), out.state

    def student_step(token, state):
        out = student(token, state)
        return student.lm_head(out.last_hidden[:, -1]), out.state

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for L in contexts:
        ids = torch.randint(0, vocab, (1, L), generator=generator).to(device)
        rows.append({"context": L, "teacher": decode_cost(teacher_step, teacher_prefill, ids, steps),
                     "student": decode_cost(student_step, student_prefill, ids, steps)})
    return {"device": str(device), "decode_steps": steps, "rows": rows}


@torch.no_grad()
def samples(teacher: FrozenTeacher, student: nn.Module, tokenizer, prompts: list[str], new_tokens: int,
            temperature: float, seed: int) -> list[dict[str, str]]:
    """Each prompt continued by both models, greedily and at `temperature` (seeded)."""
    device = next(student.parameters()).device
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        ids = torch.tensor([([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids],
                           device=device)
        row = {"prompt": prompt}
        for mode, t in (("greedy", 0.0), ("sampled", temperature)):
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": t, "top_k": 0, "top_p": 1.0} if t else {"do_sample": False}
            teacher_ids = teacher.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                                 min_new_tokens=new_tokens, pad_token_id=0, **sampling)
            generator = torch.Generator(device=device).manual_seed(seed)
            student_ids = student.generate(ids, new_tokens, temperature=t, generator=generator)
            for name, out in (("teacher", teacher_ids), ("student", student_ids)):
                row[f"{name}_{mode}"] = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        rows.append(row)
    return rows
