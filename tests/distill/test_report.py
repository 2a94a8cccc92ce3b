"""distill-eval's conversion report, on a checkpoint and on its exported folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.evaluate import evaluate
from distill.export import export
from tests.distill.helpers import SHAKESPEARE, compose_train, export_cfg, write_checkpoint
from tests.distill.test_export import STUDENTS

SUMMARY_KEYS = {"teacher_nll", "student_nll", "teacher_ppl", "student_ppl", "kl", "top1_agreement", "eval_tokens"}
REPORT_KEYS = {"alignment_errors", "nll_gap_by_position", "long_context", "samples", "continuation", "ckpt", "text"}
FILES = {"eval.json", "long_context.json", "report.md", "alignment_errors.png", "nll_gap_by_position.png",
         "long_context.png"}
CONTEXTS = [32, 64, 128]
ROW = {"tokens": 64, "rss_bytes": 2**29, "ms_per_token": 2.5, "state_bytes": 2**16}
SUMMARY = {"tokens_first": 64, "tokens_last": 64, "rss_mib_first": 512.0, "rss_mib_last": 512.0,
           "state_mib_first": 0.0625, "state_mib_last": 0.0625, "ms_per_token_start": 2.5, "ms_per_token_end": 2.5}
CONSTANT_MEMORY = {"models": {"student": {"rows": [ROW], "summary": SUMMARY}}, "tokens": 64, "every": 64,
                   "command": "python benchmarks/constant_memory.py --tokens 64", "device": "CPU", "date": "today",
                   "commit": "abc1234"}


def eval_cfg(ckpt: Path, text: Path, run_dir: Path, *extra: str):
    overrides = [*extra, f"ckpt={ckpt}", f"text={text}", "document_separator=null", "seq_len=64", "batch_size=4",
                 "eval_tokens=1024", "max_new_tokens=4", f"report.contexts.cpu={CONTEXTS}", "report.decode_steps=2",
                 "report.sample_tokens=6", "report.num_prompts=2", "report.prompt_tokens=8"]
    return compose_train(overrides, run_dir, run_dir.parent / "cache", name="eval")


@pytest.fixture(scope="module")
def reports(tiny_teacher, tmp_path_factory):
    """distill-eval on a hybrid checkpoint and on its format=hf export."""
    root = tmp_path_factory.mktemp("report")
    text = root / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text()[-20_000:])
    ckpt, student = write_checkpoint(tiny_teacher, STUDENTS["hybrid"], root / "a.ckpt")
    export(export_cfg(root, f"ckpt={ckpt}", f"out={root / 'folder'}"))
    memory = root / "constant_memory.json"
    memory.write_text(json.dumps(CONSTANT_MEMORY))
    return (student, evaluate(eval_cfg(ckpt, text, root / "from_ckpt", f"report.constant_memory={memory}")),
            evaluate(eval_cfg(root / "folder", text, root / "from_export")), root)


def test_the_report_files_exist_and_eval_json_has_every_key(reports):
    _, from_ckpt, _, root = reports
    run = root / "from_ckpt"
    assert FILES <= {p.name for p in run.iterdir()}
    saved = json.loads((run / "eval.json").read_text())
    assert SUMMARY_KEYS | REPORT_KEYS <= set(saved)
    assert len(saved["alignment_errors"]) == 2 and len(saved["nll_gap_by_position"]) == 64
    assert [r["context"] for r in saved["long_context"]["rows"]] == CONTEXTS
    assert len(saved["samples"]) == 2 and all(len(s) == 5 for s in saved["samples"])
    for png in FILES - {"eval.json", "long_context.json", "report.md"}:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert all(f"]({png})" in md for png in FILES if png.endswith(".png"))
    assert f"{saved['student_ppl']:.3f}" in md


def test_the_export_evaluates_as_the_checkpoint(reports):
    _, from_ckpt, from_export, _ = reports
    for key in ("student_nll", "teacher_nll", "kl"):
        assert abs(from_export[key] - from_ckpt[key]) <= 1e-4, key
    assert from_export["top1_agreement"] == pytest.approx(from_ckpt["top1_agreement"], abs=1e-3)
    assert from_export["alignment_errors"] == pytest.approx(from_ckpt["alignment_errors"], abs=1e-5)
    assert from_export["nll_gap_by_position"] == pytest.approx(from_ckpt["nll_gap_by_position"], abs=1e-4)
    greedy = [(s["teacher_greedy"], s["student_greedy"]) for s in from_ckpt["samples"]]
    assert [(s["teacher_greedy"], s["student_greedy"]) for s in from_export["samples"]] == greedy


def test_long_context_cost_the_kv_cache_grows_the_state_does_not(reports):
    """Bytes read per new token: the teacher's KV cache holds 2 (K, V) x layers x H_kv x D floats per
    token; the hybrid student's only in its one kept attention layer, its RWKV layer a fixed state."""
    student, from_ckpt, _, _ = reports
    rows = from_ckpt["long_context"]["rows"]
    shape = student.shape
    per_token = 2 * shape.num_kv_heads * shape.head_dim * 4  # fp32, one layer
    for a, b in zip(rows, rows[1:]):
        grown = b["context"] - a["context"]
        assert b["teacher"]["state_bytes"] - a["teacher"]["state_bytes"] == grown * per_token * shape.num_layers
        assert b["student"]["state_bytes"] - a["student"]["state_bytes"] == grown * per_token
        assert all(r[m]["seconds_per_token"] > 0 for r in (a, b) for m in ("teacher", "student"))


def test_a_constant_memory_json_joins_the_report_only_when_given(reports):
    _, from_ckpt, from_export, root = reports
    md = (root / "from_ckpt" / "report.md").read_text()
    assert (root / "from_ckpt" / "constant_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![constant memory](constant_memory.png)" in md and "`python benchmarks/constant_memory.py --tokens 64`" in md
    assert "| student (transformers) | 512.0 → 512.0 (64 → 64 tokens) | 0.062 → 0.062 | 2.50 → 2.50 |" in md
    assert from_ckpt["constant_memory"] == CONSTANT_MEMORY and "constant_memory" not in from_export
    assert "constant memory" not in (root / "from_export" / "report.md").read_text()
    assert not (root / "from_export" / "constant_memory.png").exists()
