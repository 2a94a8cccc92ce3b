"""student.attention_layers=auto:K in a real job on the tiny teacher: the worst-aligned layer after
the align stage becomes the teacher's attention, exactly, and every later reader rebuilds it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from distill.checkpoints import read_checkpoint
from distill.restore import from_checkpoint
from distill.hybrid import MEASURE_BATCHES, plan
from distill.train import make_data, train
from models.attention import TeacherAttention
from models.diagnostics import alignment_errors
from models.student import StudentConfig, build_student
from models.teacher import FrozenTeacher, load_teacher
from tests.distill.helpers import compose_tiny_job, compose_train

AUTO = ["student.attention_layers=auto:1"]


class RecordStudent(L.Callback):
    """A copy of the student as each stage starts (class-level: Hydra builds the instance)."""

    seen: dict[str, tuple[list[int], dict[str, torch.Tensor]]] = {}

    def on_train_start(self, trainer, module):
        student = module.student
        RecordStudent.seen[module.stage.name] = (list(student.config.attention_layers),
                                                 copy.deepcopy(student.state_dict()))


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def auto_run(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    record = [f"+callbacks.record._target_={__name__}.RecordStudent"]
    cfg = compose_tiny_job(tiny_teacher, root / "run", root / "cache", steps=6, extra=AUTO + record)
    messages, logger = Messages(), logging.getLogger("distill")
    level = logger.level
    logger.addHandler(messages), logger.setLevel(logging.INFO)
    try:
        summary = train(cfg)
    finally:
        logger.removeHandler(messages), logger.setLevel(level)
    return cfg, summary, dict(RecordStudent.seen), messages.lines


def checkpoint(cfg, name: str) -> dict:
    return read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / f"{name}.ckpt")


def test_auto_keeps_the_layer_with_the_largest_alignment_error(auto_run, tiny_teacher):
    cfg, _, _, messages = auto_run
    align_end = checkpoint(cfg, "stage0-align")
    assert align_end["distill"]["config"]["student"]["attention_layers"] == []  # still all RWKV there
    model, tokenizer = load_teacher(tiny_teacher)
    teacher = FrozenTeacher(model)
    student = build_student(model, StudentConfig(**align_end["distill"]["config"]["student"]))
    student.load_state_dict({k.removeprefix("student."): v for k, v in align_end["state_dict"].items()})
    batches = make_data(cfg, tokenizer, teacher, cfg.evaluation.seq_len,
                        cfg.evaluation.batch_size).heldout_batches()[:MEASURE_BATCHES]
    per_batch = [(alignment_errors(teacher, student, b["input_ids"]), b["input_ids"].numel()) for b in batches]
    tokens = sum(n for _, n in per_batch)
    errors = [sum(e[i] * n for e, n in per_batch) / tokens for i in range(2)]
    worst = max(range(2), key=errors.__getitem__)
    assert abs(errors[0] - errors[1]) > 0.05 * max(errors)  # a real choice, not a tie
    assert checkpoint(cfg, "stage1-kl")["distill"]["config"]["student"]["attention_layers"] == [worst]
    assert any(f"keeps the teacher's attention in layers [{worst}]" in line and f"{errors[worst]:.3f}" in line
               for line in messages)


def test_kept_layer_is_the_teachers_attention_exactly_at_the_switch(auto_run, tiny_teacher):
    cfg, _, seen, _ = auto_run
    assert seen["align"][0] == []
    (kept,), at_switch = seen["kl"]
    assert isinstance(build_student(load_teacher(tiny_teacher)[0], StudentConfig(attention_layers=[kept]))
                      .layers[kept].time_mix, TeacherAttention)
    teacher = load_teacher(tiny_teacher)[0].state_dict()
    fresh = f"layers.{kept}.time_mix."
    copied = {k: v for k, v in at_switch.items() if k.startswith(fresh)}
    assert copied and all(torch.equal(v, teacher[k.replace(fresh, f"model.layers.{kept}.self_attn.")])
                          for k, v in copied.items())
    trained = {k.removeprefix("student."): v for k, v in checkpoint(cfg, "stage0-align")["state_dict"].items()}
    assert all(torch.equal(v, trained[k]) for k, v in at_switch.items() if not k.startswith(fresh))


def test_resume_after_the_switch_rebuilds_the_hybrid(auto_run, tmp_path):
    cfg, summary, seen, _ = auto_run
    kl_end = Path(cfg.paths.output_dir) / "checkpoints" / "stage1-kl.ckpt"
    again = train(compose_tiny_job(Path(cfg.teacher.path), tmp_path / "again", Path(cfg.paths.cache_dir),
                                   steps=6, extra=AUTO + [f"ckpt_path={kl_end}"]))
    assert again["student_ppl"] == pytest.approx(summary["student_ppl"], rel=1e-9)
    _, _, student, _ = from_checkpoint(kl_end)  # distill-eval's and distill-export's reader
    assert [type(b.time_mix) is TeacherAttention for b in student.layers].count(True) == 1
    assert student.config.attention_layers == seen["kl"][0]


def test_resume_from_the_align_end_switches_the_same_way(auto_run, tmp_path):
    cfg, summary, _, _ = auto_run
    align_end = Path(cfg.paths.output_dir) / "checkpoints" / "stage0-align.ckpt"
    resumed = train(compose_tiny_job(Path(cfg.teacher.path), tmp_path / "resumed", Path(cfg.paths.cache_dir),
                                     steps=6, extra=AUTO + [f"ckpt_path={align_end}"]))
    assert resumed["stages"][1]["final_loss"] == pytest.approx(summary["stages"][1]["final_loss"], rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(summary["student_ppl"], rel=1e-6)


@pytest.mark.parametrize("value, match", [
    ("auto:2", r"auto:2: the teacher has 2 layers; valid: auto:1 \.\. auto:1"),
    ("auto:0", r"valid: auto:1 \.\. auto:1"),
])
def test_auto_count_is_checked_before_any_stage_trains(tiny_teacher, tmp_path, value, match):
    cfg = compose_tiny_job(tiny_teacher, tmp_path / "run", tmp_path / "cache", extra=[f"student.attention_layers={value}"])
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_auto_needs_a_stage_after_the_align_stage_and_a_well_formed_count(tmp_path):
    cfg = compose_train(AUTO + ["stages.1.loss=align"], tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match="needs a stage after it"):
        plan(cfg, {})
    cfg = compose_train(["student.attention_layers=auto:two"], tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match=r"attention_layers='auto:two': give a list of layer indices"):
        plan(cfg, {})
