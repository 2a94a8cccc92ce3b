"""logger=[csv,wandb] on a tiny job with no API key: W&B runs offline by itself, and its records,
read back from the run file, hold what the job logged (distill/tracking.py)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.tracking import heatmap
from tests.distill.helpers import job_overrides, run_job
from tests.distill.wandb_records import read_run

LOG_EVERY = 2


def no_key_env(home: Path) -> dict:
    """The environment of a machine without W&B credentials (and no WANDB_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return {**env, "HOME": str(home)}


@pytest.fixture(scope="module")
def wandb_run(stdlib_teacher, corpus, tmp_path_factory):
    """A finished job, then the same run dir resumed (ckpt_path=last: it only evaluates again)."""
    root = tmp_path_factory.mktemp("wandb")
    overrides = job_overrides(stdlib_teacher, corpus, root / "cache") + [
        "logger=[csv,wandb]", f"trainer.log_every_n_steps={LOG_EVERY}"]
    run, env = root / "run", no_key_env(root / "home")
    for extra in ([], ["ckpt_path=last"]):
        result = run_job(run, overrides + extra, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    return run, [read_run(r) for r in runs], runs


def test_runs_offline_and_a_resumed_job_continues_the_same_run(wandb_run):
    run, records, dirs = wandb_run
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(dirs) == 2 and [r["id"] for r in records] == [run_id, run_id]
    assert not list((run / "wandb").glob("run-*"))  # nothing made for an online run


def test_losses_lr_grad_norm_throughput_and_stage_boundaries_are_logged(wandb_run):
    run, (first, _), _ = wandb_run
    keys = set().union(*first["history"])
    for stage, parts in (("align", ["loss", "align", "align_layer0", "align_layer1", "lr"]),
                         ("kl", ["loss", "kl", "hidden", "ce", "top1", "lr"])):
        assert {f"{stage}/{p}" for p in parts} <= keys, sorted(keys)
    assert {"tok/s", "grad_norm"} <= keys
    # W&B receives every metric the CSV logger receives
    with open(run / "logs" / "metrics.csv") as f:
        csv_keys = set(next(csv.reader(f))) - {"epoch", "step"}
    assert csv_keys <= keys, sorted(csv_keys - keys)
    stages = [row["stage"] for row in first["history"] if "stage" in row]
    assert stages == [0, 0, 1, 1]  # each stage's start and end


def _table(run_dir: Path, entry: dict, key: str) -> dict:
    return json.loads((run_dir / "files" / entry[f"{key}/path"]).read_text())


def _entry(records: dict, key: str) -> dict:
    (row,) = [row for row in records["history"] if f"{key}/_type" in row]
    return row


def test_tables_and_heatmap_hold_the_runs_numbers(wandb_run):
    run, (first, _), (first_dir, _) = wandb_run
    summary = json.loads((run / "summary.json").read_text())
    eval_table = _table(first_dir, _entry(first, "eval"), "eval")
    values = dict(zip(eval_table["columns"], eval_table["data"][0]))
    for key in ("teacher_ppl", "student_ppl", "kl", "top1_agreement", "tokens_seen"):
        assert values[key] == pytest.approx(summary[key], rel=1e-12)
    generations = _table(first_dir, _entry(first, "generations"), "generations")
    assert generations["data"] == [[summary["continuation"][k] for k in ("prompt", "teacher", "student")]]
    stages = _table(first_dir, _entry(first, "stages"), "stages")
    assert [row[0] for row in stages["data"]] == ["align", "kl"]
    final = _table(first_dir, _entry(first, "alignment_errors"), "alignment_errors")
    assert [row[1] for row in final["data"]] == pytest.approx(summary["alignment_errors"], rel=1e-12)

    steps = list(range(LOG_EVERY, 8 + 1, LOG_EVERY))  # the align stage's logged steps
    history = _table(first_dir, _entry(first, "align/alignment_errors"), "align/alignment_errors")
    assert [(row[1], row[2]) for row in history["data"]] == [(s, layer) for s in steps for layer in (0, 1)]
    assert all(row[3] > 0 for row in history["data"])
    entry = _entry(first, "align/alignment_heatmap")
    (png,) = entry["align/alignment_heatmap/filenames"]
    grid = np.array([row[3] for row in history["data"]]).reshape(len(steps), 2).T  # [layers, steps]
    np.testing.assert_array_equal(np.asarray(Image.open(first_dir / "files" / png).convert("RGB")), heatmap(grid))


def test_the_resolved_config_is_recorded(wandb_run, stdlib_teacher):
    _, (first, _), _ = wandb_run
    config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in first["config"].items()}
    assert {"teacher", "student", "stages", "trainer", "data", "seed"} <= set(config)
    assert config["teacher"]["path"] == str(stdlib_teacher) and config["seed"] == 1234
    assert [s["name"] for s in config["stages"]] == ["align", "kl"]
