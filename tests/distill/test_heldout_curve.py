"""evaluation.every_n_steps: held-out metrics during training, against tokens seen over all stages."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from distill.heldout_curve import HeldoutCurve
from distill.train import train
from tests.distill.helpers import compose_tiny_job, compose_train


def curve(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if k.startswith("val/") and v}
                for row in csv.DictReader(f) if row.get("val/tokens")]


def test_curve_points_every_n_steps_and_at_stage_ends(tiny_teacher, tmp_path):
    cfg = compose_tiny_job(tiny_teacher, tmp_path / "run", tmp_path / "cache", steps=6,
                           extra=["evaluation.every_n_steps=4", "evaluation.curve_tokens=2048"])
    summary = train(cfg)
    points = curve(tmp_path / "run")
    step_tokens = 4 * 64
    # align: start, step 4, end (6); kl: start (= align end, counted again), step 4, end
    assert [p["val/tokens"] for p in points] == [0, 4 * step_tokens, 6 * step_tokens,
                                                 6 * step_tokens, 10 * step_tokens, 12 * step_tokens]
    assert points[-1]["val/tokens"] == summary["tokens_seen"]
    # the last point is the end-of-run evaluation: same student, same held-out tokens
    for key in ("student_nll", "teacher_nll", "kl", "top1_agreement"):
        assert points[-1][f"val/{key}"] == pytest.approx(summary[key], rel=1e-6)
    assert len({p["val/teacher_nll"] for p in points}) == 1  # the frozen teacher never changes
    assert len({p["val/student_nll"] for p in points[:3]}) == 3  # the student moves between points
    assert points[2] == points[3]  # the kl stage starts from the align stage's end


def test_curve_is_off_by_default(tmp_path):
    assert compose_train([], tmp_path / "run", tmp_path / "cache").evaluation.every_n_steps is None
    HeldoutCurve(None, 64, 4, 2048).on_train_start(None, None)  # touches neither trainer nor module


def test_bad_interval_is_one_clear_error(tiny_teacher, tmp_path):
    cfg = compose_tiny_job(tiny_teacher, tmp_path / "run", tmp_path / "cache", extra=["evaluation.every_n_steps=0"])
    with pytest.raises(Exception, match=r"evaluation.every_n_steps=0 must be >= 1"):
        train(cfg)
