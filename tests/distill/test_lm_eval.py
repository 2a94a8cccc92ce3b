"""lm-eval-harness on an exported folder (`--model hf`, trust_remote_code) with the local tasks of
benchmarks/lm_eval: its loglikelihoods and greedy generations equal our own evaluation of the student."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from distill.export import export
from tests.distill.helpers import REPO
from tests.distill.test_export import STUDENTS, export_cfg, write_checkpoint

TASKS = REPO / "benchmarks" / "lm_eval"


def our_loglikelihood(student, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation | context), the continuation's tokens being those of context +
    continuation after the context's own (lm-eval's split of a pair)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n = len(tokenizer.encode(context, add_special_tokens=False))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = student.logits(ids[:, :-1]).log_softmax(-1)[0]  # [T - 1, V]
    targets = ids[0, n:]
    return logp[n - 1:].gather(-1, targets[:, None]).sum().item()


def our_generation(student, tokenizer, context: str, until: list[str], max_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
    out = student.generate(ids, max_tokens, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(out, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.mark.slow
def test_lm_eval_loglikelihoods_and_generations_equal_ours(tiny_teacher, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    ckpt, student = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], tmp_path / "a.ckpt")
    export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'folder'}"))
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'folder'},trust_remote_code=True",
        tasks=["distill_local_ll", "distill_local_gen"], task_manager=TaskManager(include_path=str(TASKS)),
        device="cpu", batch_size=1, log_samples=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    pairs = [json.loads(line) for line in (TASKS / "tinyshakespeare_pairs.jsonl").read_text().splitlines()]
    ll = results["samples"]["distill_local_ll"]
    assert len(ll) == len(pairs) == 16
    for sample in ll:
        doc = sample["doc"]
        got = sample["resps"][0][0][0]
        assert got == pytest.approx(our_loglikelihood(student, tokenizer, doc["context"], doc["continuation"]),
                                    abs=1e-4)
    generated = results["samples"]["distill_local_gen"]
    assert len(generated) == 16
    for sample in generated:
        want = our_generation(student, tokenizer, sample["doc"]["context"], ["\n"], 16)
        assert sample["filtered_resps"][0] == want
