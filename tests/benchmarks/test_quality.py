"""benchmarks/quality.py: its arithmetic on curves, its results file, and one real smoke grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import quality
from tests.distill.helpers import ASSETS, SHAKESPEARE

CURVE = [{"tokens": 0.0, "student_nll": 8.0}, {"tokens": 100.0, "student_nll": 6.0},
         {"tokens": 200.0, "student_nll": 5.0}, {"tokens": 300.0, "student_nll": 4.5}]


def test_crossing_and_interpolation_on_a_curve():
    assert quality.crossing(CURVE, 5.5) == pytest.approx(150.0)
    assert quality.crossing(CURVE, 6.0) == pytest.approx(100.0)
    assert quality.crossing(CURVE, 4.0) is None  # never reached
    assert quality.at_tokens(CURVE, 250.0) == pytest.approx(4.75)
    assert quality.at_tokens(CURVE, 400.0) is None


def test_results_section_is_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n")
    section = lambda body: f"<!-- quality:cpu:begin -->\n{body}\n<!-- quality:cpu:end -->\n"  # noqa: E731
    quality.replace_section(results, section("one"), "cpu")
    quality.replace_section(results, section("two"), "cpu")
    quality.replace_section(results, "<!-- quality:gpu:begin -->\ng\n<!-- quality:gpu:end -->\n", "gpu")
    text = results.read_text()
    assert text.startswith("# Results\n\nintro\n") and "one" not in text
    assert text.count("two") == 1 and text.index("two") < text.index("quality:gpu:begin")


def test_every_preset_composes():
    for preset, runs_of in quality.BUDGETS.items():
        for run in runs_of(Path("/nowhere/smollm2")):
            stages = quality.composed_stages(run.overrides)
            assert stages, run.name
            assert run.teacher in quality.TEACHER_LABELS


@pytest.mark.slow
def test_smoke_grid_reports_what_its_runs_wrote(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS to the shared assets folder)")
    out = tmp_path / "out"
    quality.main(["--preset", "smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                  "--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "RESULTS.md")])
    report = json.loads((out / "quality.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"quickstart.rad_rwkv7", "quickstart.reverse_kl", "quickstart.scratch"}
    main = runs["quickstart.rad_rwkv7"]
    summary = json.loads((tmp_path / "work" / "runs" / "quickstart.rad_rwkv7" / "summary.json").read_text())
    assert main["summary"] == summary
    assert main["curve"][0]["tokens"] == 0 and main["curve"][-1]["tokens"] == summary["tokens_seen"] == 6144
    assert 0 < main["heldout"]["tinyshakespeare"]["eval_tokens"] <= 16384
    if runs["quickstart.reverse_kl"]["status"] == "skipped":
        assert "kind" in runs["quickstart.reverse_kl"]["reason"]
    b = report["baselines"]["quickstart"]
    scratch = runs["quickstart.scratch"]["curve"]
    assert b["distilled_nll"] == main["curve"][-1]["student_nll"]
    expected = quality.crossing(scratch, b["distilled_nll"])
    assert b["scratch_tokens_to_distilled_nll"] == expected
    assert (b["token_ratio"] is None) == (expected is None)
    assert (out / "quality_quickstart.png").stat().st_size > 10_000
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"| quickstart.rad_rwkv7 | RAD-RWKV7, align 2,048 + kl 4,096 | 6,144 | {summary['student_nll']:.4f} |" in text
    assert math.isfinite(report["wall_seconds"])
    quality.main(["--render", str(out / "quality.json"), "--out", str(tmp_path / "again")])  # e.g. a GPU session's
    assert (tmp_path / "again" / "RESULTS.smoke.md").read_text() == (out / "RESULTS.smoke.md").read_text()
    # --resume keeps the finished runs (nothing is rerun here) and says which command measured them
    quality.main(["--preset", "smoke", "--resume", "--only", "quickstart.rad_rwkv7", "--out", str(out),
                  "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")])
    resumed = json.loads((out / "quality.json").read_text())
    assert resumed["runs"] == runs
    assert resumed["earlier"][0]["runs"] == list(runs) and resumed["earlier"][0]["date"] == report["date"]
    assert "quickstart.rad_rwkv7, quickstart.reverse_kl, quickstart.scratch: measured by an earlier command" in (
        out / "RESULTS.smoke.md").read_text()
    with pytest.raises(ValueError, match="holds preset 'smoke', not 'cpu'"):
        quality.main(["--preset", "cpu", "--resume", "--out", str(out), "--work", str(tmp_path / "work")])


def test_resume_keeps_only_runs_with_the_same_overrides():
    run = quality.Run("t.a", "quickstart", "a", quality.Budget(1, 2, 3, 4, 5, 6, 7), ["x=1", "stage_tokens.kl=10"])
    assert quality.same_run({"command": ["python", "-m", "distill.train", "x=1", "stage_tokens.kl=10", "y=2"]}, run)
    assert not quality.same_run({"command": ["python", "-m", "distill.train", "x=1", "stage_tokens.kl=20"]}, run)
