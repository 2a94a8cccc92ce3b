"""benchmarks/constant_memory.py on a tiny N: the student's state holds the same bytes after every
token, in both runtimes; the teacher's KV cache grows by the same bytes per token; the rows render
as the conversion report's section."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from benchmarks import constant_memory as cm
from distill.evaluate import evaluate
from distill.generate import HFStep, OnnxStep, prompt_ids
from distill.report_render import constant_memory_section, plot_constant_memory
from tests.distill.helpers import compose_train

TOKENS, EVERY = 256, 32


def test_student_state_is_constant_and_teacher_kv_grows_linearly(exported_student, tmp_path):
    _, onnx_folder, hf_folder = exported_student
    prompt = prompt_ids(AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=True), "ROMEO:")  # [1, P]
    student_rows, tokens = cm.measure(HFStep(hf_folder), prompt, TOKENS, EVERY)
    onnx_rows, onnx_tokens = cm.measure(OnnxStep(onnx_folder / "model.onnx"), prompt, TOKENS, EVERY)
    teacher = cm.TeacherStep(hf_folder)
    teacher_rows, forced = cm.measure(teacher, prompt, TOKENS, EVERY, forced=tokens)
    assert onnx_tokens == tokens == forced and len(tokens) == TOKENS
    assert [r["tokens"] for r in student_rows] == list(range(EVERY, TOKENS + 1, EVERY))
    state = {r["state_bytes"] for r in student_rows}
    assert len(state) == 1 and state == {r["state_bytes"] for r in onnx_rows} and state.pop() > 0
    config = teacher.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    seen = [prompt.shape[1] + r["tokens"] for r in teacher_rows]  # the prompt, then every token fed
    assert [r["state_bytes"] for r in teacher_rows] == [n * per_token for n in seen]
    assert all(r["rss_bytes"] > 2**20 and r["ms_per_token"] > 0 for r in student_rows + onnx_rows + teacher_rows)

    models = {name: {"rows": rows, "summary": cm.summary(rows)}
              for name, rows in (("student", student_rows), ("student_onnx", onnx_rows), ("teacher", teacher_rows))}
    assert models["teacher"]["summary"]["state_mib_last"] == seen[-1] * per_token / 2**20
    result = {"models": models, "tokens": TOKENS, "every": EVERY, "command": "python benchmarks/constant_memory.py",
              "device": "CPU", "date": "today", "commit": "abc"}
    plot_constant_memory(result, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = "\n".join(constant_memory_section(result))
    assert "![constant memory](constant_memory.png)" in section and "teacher (KV cache)" in section
    assert f"{models['teacher']['summary']['state_mib_last']:.3f}" in section


def test_distill_eval_refuses_a_missing_constant_memory_json_before_loading_anything(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("text")
    cfg = compose_train([f"ckpt={tmp_path / 'no.ckpt'}", f"text={text}", f"report.constant_memory={tmp_path / 'no.json'}"],
                        tmp_path / "run", tmp_path / "cache", name="eval")
    with pytest.raises(FileNotFoundError, match=r"report.constant_memory='.*no.json': no such file"):
        evaluate(cfg)
