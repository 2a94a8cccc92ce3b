"""The real training entry point, run on a tiny teacher (seconds per job on CPU)."""

from __future__ import annotations

import csv
import math
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from distill.evaluate import evaluate
from distill.train import train
from tests.distill.helpers import ASSETS, REPO, SHAKESPEARE, compose_tiny_job, compose_train

STORIES = ASSETS / "text" / "tinystories_valid_head45.txt"

SUMMARY_KEYS = {"teacher_ppl", "student_ppl", "kl", "top1_agreement", "tokens_seen", "wall_seconds",
                "tokens_per_second", "stages", "alignment_errors"}


def _metric(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher, tmp_path_factory):
    """One two-stage job on the random tiny teacher; shared by the plumbing assertions below."""
    root = tmp_path_factory.mktemp("job")
    cfg = compose_tiny_job(tiny_teacher, root / "run", root / "cache", steps=6)
    return cfg, train(cfg)


def test_summary_has_every_key_and_files(tiny_run):
    cfg, summary = tiny_run
    run_dir = Path(cfg.paths.output_dir)
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [s["name"] for s in summary["stages"]] == ["align", "kl"]
    assert all({"tokens", "final_loss"} <= set(s) for s in summary["stages"])
    assert summary["tokens_seen"] == 2 * 6 * 4 * 64
    for name in ("last.ckpt", "stage0-align.ckpt", "stage1-kl.ckpt"):
        assert (run_dir / "checkpoints" / name).is_file()
    assert not list((run_dir / "checkpoints").glob("last-v*.ckpt"))
    assert 0 <= summary["top1_agreement"] <= 1 and summary["kl"] >= 0
    assert len(summary["alignment_errors"]) == 2 and all(e >= 0 for e in summary["alignment_errors"])
    norms = _metric(run_dir, "grad_norm")
    assert len(norms) >= 2 and all(math.isfinite(n) and n > 0 for n in norms)


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory):
    """The real stories260K teacher on real TinyStories text: 160 align steps, 100 kl steps."""
    if not STORIES.is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS)")
    root = tmp_path_factory.mktemp("stories")
    overrides = [
        "experiment=stories260k", f"assets_dir={ASSETS}", "data=text", "~data.source.num_documents",
        f"data.source.paths=[{STORIES}]",
        "data.source.document_separator='<|endoftext|>'", "data.source.heldout_percent=10",
        "data.eval_tokens=2048", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "trainer.log_every_n_steps=1",
        "stages.0.seq_len=64", "stages.0.batch_size=4", "stages.0.lr=1e-2", f"stages.0.tokens={160 * 256}",
        "stages.1.seq_len=64", "stages.1.batch_size=4", "stages.1.lr=2e-3", f"stages.1.tokens={100 * 256}",
        "evaluation.seq_len=64", "evaluation.batch_size=4", "evaluation.max_new_tokens=8",
    ]
    cfg = compose_train(overrides, root / "run", root / "cache")
    return cfg, train(cfg)


def test_align_stage_halves_the_alignment_loss(stories_run):
    cfg, _ = stories_run
    align = _metric(Path(cfg.paths.output_dir), "align/align")
    assert len(align) == 160
    assert sum(align[-5:]) / 5 <= 0.5 * sum(align[:5]) / 5


def test_kl_stage_lowers_heldout_kl(stories_run, tmp_path):
    """distill-eval on the align-stage checkpoint vs the final one: the kl stage must have helped."""
    cfg, summary = stories_run
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    kl = {}
    for name in ("stage0-align", "stage1-kl"):
        eval_cfg = compose_train([f"ckpt={checkpoints / name}.ckpt", f"text={STORIES}", "seq_len=64",
                                  "max_new_tokens=4"], tmp_path / name, tmp_path / "cache", name="eval")
        kl[name] = evaluate(eval_cfg)["kl"]
        assert (tmp_path / name / "eval.json").is_file()
    assert kl["stage1-kl"] < 0.8 * kl["stage0-align"]
    assert summary["student_ppl"] < 1.5 * summary["teacher_ppl"]


def test_resuming_a_finished_run_only_evaluates(tiny_run, tmp_path):
    cfg, summary = tiny_run
    last = Path(cfg.paths.output_dir) / "checkpoints" / "stage1-kl.ckpt"
    again = train(compose_tiny_job(Path(cfg.teacher.path), tmp_path / "again", Path(cfg.paths.cache_dir),
                                   steps=6, extra=[f"ckpt_path={last}"]))
    assert again["stages"] == summary["stages"]
    assert again["student_ppl"] == pytest.approx(summary["student_ppl"], rel=1e-9)


def test_resuming_from_a_stage_end_checkpoint_runs_the_next_stage_from_its_weights(tiny_run, tmp_path):
    cfg, summary = tiny_run
    align_end = Path(cfg.paths.output_dir) / "checkpoints" / "stage0-align.ckpt"
    resumed = train(compose_tiny_job(Path(cfg.teacher.path), tmp_path / "resumed", Path(cfg.paths.cache_dir),
                                     steps=6, extra=[f"ckpt_path={align_end}"]))
    assert [s["name"] for s in resumed["stages"]] == ["align", "kl"]
    assert resumed["stages"][1]["final_loss"] == pytest.approx(summary["stages"][1]["final_loss"], rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(summary["student_ppl"], rel=1e-6)


def test_checkpoint_holds_student_only(tiny_run):
    import torch

    cfg, _ = tiny_run
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["distill"]["stage_name"] == "kl"


class CrashAtStep(L.Callback):
    """Simulates a preemption: dies when `stage` reaches `step` (after that step's checkpoint)."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.stage.name == self.stage and trainer.global_step == self.step:
            raise RuntimeError("simulated preemption")


@pytest.mark.parametrize("crash_stage", ["align", "kl"])
def test_resume_matches_uninterrupted_run(tiny_teacher, tmp_path, crash_stage):
    steps = 8
    full = train(compose_tiny_job(tiny_teacher, tmp_path / "full", tmp_path / "cache", steps=steps))

    run = tmp_path / "interrupted"
    crash = [f"+callbacks.crash._target_={__name__}.CrashAtStep", f"+callbacks.crash.stage={crash_stage}",
             "+callbacks.crash.step=4"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(compose_tiny_job(tiny_teacher, run, tmp_path / "cache", steps=steps, extra=crash))
    resumed = train(compose_tiny_job(tiny_teacher, run, tmp_path / "cache", steps=steps, extra=["ckpt_path=last"]))

    for a, b in zip(full["stages"], resumed["stages"]):
        assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    assert resumed["kl"] == pytest.approx(full["kl"], rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(full["student_ppl"], rel=1e-6)


def _cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.train", f"hydra.run.dir={tmp_path}/run",
         f"paths.cache_dir={tmp_path}/cache", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_missing_teacher_is_one_clear_error(tmp_path):
    result = _cli("teacher.path=/no/such/teacher", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "error: teacher '/no/such/teacher' not found" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_head_size_is_one_clear_error(tiny_teacher, tmp_path):
    result = _cli(f"teacher.path={tiny_teacher}", "student.head_size=12", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "head_size" in result.stderr and "12" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_empty_data_is_one_clear_error(tiny_teacher, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = _cli(f"teacher.path={tiny_teacher}", "data=text", f"data.source.paths=[{empty}]", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "empty data" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("student", [
    ["student=rad_rwkv7"],
    ["student=rwkv7"],
    ["student=rad_rwkv6"],
    ["student=rwkv7", "student.ffn=rwkv"],
    ["student=rad_rwkv7", "student.attention_layers=[1]"],
], ids=lambda o: " ".join(o))
def test_smoke_runs_every_student_type_on_the_quickstart_teacher(student, shakespeare, tmp_path, tmp_path_factory):
    """debug=smoke with the embedded teacher (shorter steps and a small text corpus, for CI time)."""
    cache = tmp_path_factory.getbasetemp() / "smoke-cache"  # shared: tokenize Shakespeare once
    overrides = ["debug=smoke", *student, "data=text", f"data.source.paths=[{SHAKESPEARE}]",
                 "max_steps_per_stage=4", "stages.0.seq_len=64", "stages.1.seq_len=64",
                 "evaluation.seq_len=64", "evaluation.max_new_tokens=4", "data.eval_tokens=1024",
                 "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
    cfg = compose_train(overrides, tmp_path / "run", cache)
    cfg.data.source.document_separator = "\n\n"
    summary = train(cfg)
    assert summary["tokens_seen"] == 2 * 4 * 8 * 64
    assert all(math.isfinite(s["final_loss"]) for s in summary["stages"])
    assert math.isfinite(summary["student_ppl"]) and len(summary["alignment_errors"]) == 4


def test_nan_loss_stops_with_one_line_and_keeps_earlier_checkpoints(tiny_teacher, tmp_path):
    """An absurd kl learning rate blows the student up: the job stops on the non-finite loss with
    exit status 2 and one line, and the align stage's checkpoints stay on disk."""
    result = _cli(f"teacher.path={tiny_teacher}", "data=text", f"data.source.paths=[{SHAKESPEARE}]",
                  "data.source.document_separator=null", "data.source.heldout_percent=0",
                  "+data.heldout_source._target_=distill.data.LocalFilesSource",
                  f"+data.heldout_source.paths=[{SHAKESPEARE}]", "max_steps_per_stage=3",
                  "stages.0.seq_len=32", "stages.1.seq_len=32", "stages.1.lr=1e30", "stages.1.warmup_fraction=0",
                  "trainer.enable_progress_bar=false", "~callbacks.progress_bar", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stage 'kl': loss is nan" in result.stderr or "stage 'kl': loss is inf" in result.stderr
    assert "stages[1].lr" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert (tmp_path / "run" / "checkpoints" / "stage0-align.ckpt").is_file()


def _ddp_job(tiny_teacher, tmp_path: Path, devices: int, batch_size: int) -> subprocess.CompletedProcess:
    return _cli(f"teacher.path={tiny_teacher}", "data=text", f"data.source.paths=[{SHAKESPEARE}]",
                "data.source.document_separator=null", "data.source.heldout_percent=0",
                "+data.heldout_source._target_=distill.data.LocalFilesSource",
                f"+data.heldout_source.paths=[{SHAKESPEARE}]", "data.eval_tokens=2048",
                "max_steps_per_stage=3", "stages.0.seq_len=32", "stages.1.seq_len=32", "evaluation.seq_len=32",
                f"stages.0.batch_size={batch_size}", f"stages.1.batch_size={batch_size}",
                "trainer.accelerator=cpu", f"trainer.devices={devices}", "strategy=ddp",
                "trainer.enable_progress_bar=false", "~callbacks.progress_bar", tmp_path=tmp_path)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_equals_one_process_with_the_same_global_batch(tiny_teacher, tmp_path):
    """The real CLI with trainer.devices=2 strategy=ddp (gloo on CPU): each rank trains on its shard of
    the sampler (4 of the 8 windows a single process takes per step), tokens are counted over the world,
    rank zero writes one summary, and the losses equal a one-process run with batch 8: DDP averages two
    equal halves' gradients, the same mean as one batch, up to float32 summation order (rel 1e-5 here;
    3 steps of Adam amplify rounding little)."""
    two = _ddp_job(tiny_teacher, tmp_path / "two", devices=2, batch_size=4)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stderr + two.stdout
    assert (two.stdout + two.stderr).count("student/teacher ppl") == 1
    one = _ddp_job(tiny_teacher, tmp_path / "one", devices=1, batch_size=8)
    assert one.returncode == 0, one.stderr[-3000:]
    summaries = [json.loads((tmp_path / name / "run" / "summary.json").read_text()) for name in ("two", "one")]
    assert summaries[0]["tokens_seen"] == summaries[1]["tokens_seen"] == 2 * 3 * 8 * 32  # stages x steps x batch x seq
    for a, b in zip(*(s["stages"] for s in summaries), strict=True):
        # the kl stage's loss is a small KL (random teacher): absolute rounding, as for kl below
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5, abs=1e-7), (a, b)
    assert summaries[0]["student_ppl"] == pytest.approx(summaries[1]["student_ppl"], rel=1e-5)
    # KL is a small difference of two ~5-nat log-probabilities: its rounding is absolute, not relative
    assert summaries[0]["kl"] == pytest.approx(summaries[1]["kl"], rel=0, abs=1e-7)
