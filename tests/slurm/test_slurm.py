"""distill-train on a real SLURM cluster (one node, this machine; tests/slurm/conftest.py): the
sbatch template and the Hydra launcher, a sweep, and jobs stopped by `scontrol requeue` and by
their time limit, which come back by themselves and end as an uninterrupted run does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.train import train
from tests.distill.helpers import REPO, compose_train, job_overrides

pytestmark = pytest.mark.slurm

TEMPLATE = REPO / "jobs" / "slurm" / "distill.sbatch"
STEPS, PACE = 20, 1.0  # a paced step lasts PACE s: SLURM's signals find the job training
# hydra/launcher=slurm on a CPU-only cluster: no GPUs to ask for, one CPU per task
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_gpu=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="module")
def job(stdlib_teacher, corpus, tmp_path_factory):
    """(the overrides of a paced two-stage job, the summary of the same job run uninterrupted)."""
    root = tmp_path_factory.mktemp("slurm-job")
    overrides = job_overrides(stdlib_teacher, corpus, root / "cache", steps=STEPS)
    reference = train(compose_train(overrides, root / "reference", root / "cache"))
    pace = ["+callbacks.pace._target_=tests.distill.interrupts.Pace", f"+callbacks.pace.seconds={PACE}"]
    return overrides + pace, reference


def assert_ends_like(summary: dict, reference: dict) -> None:
    for a, b in zip(reference["stages"], summary["stages"], strict=True):
        assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    assert summary["student_ppl"] == pytest.approx(reference["student_ppl"], rel=1e-6)


def assert_saved_then_resumed(log: str, signal: str, run_dir: Path) -> tuple[str, int]:
    """The job noted `signal`, wrote last.ckpt at the end of that step, and its rerun resumed from it;
    returns the (stage, step) of that checkpoint."""
    last = re.escape(f"{run_dir}/checkpoints/last.ckpt")
    saved = re.search(rf"received {signal}: saving and stopping at the end of this step.*?"
                      rf"saved {last} at step (\d+) of stage '(\w+)'", log, re.S)
    assert saved, log[-4000:]
    assert f"requeued SLURM job (restart 1): resuming from {run_dir}/checkpoints/last.ckpt" in log
    return saved.group(2), int(saved.group(1))


def test_sbatch_template_job_requeued_mid_training_comes_back_and_ends_like_an_uninterrupted_run(cluster, job,
                                                                                                 tmp_path):
    overrides, reference = job
    submitted = cluster.run("sbatch", "--parsable", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                            "--time=10", f"--chdir={tmp_path}", f"--output={tmp_path}/batch-%j.out",
                            str(TEMPLATE), *overrides)
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "outputs" / "slurm" / job_id  # the template's run dir: fixed by the job id
    cluster.wait("the first checkpoint", (run_dir / "checkpoints" / "last.ckpt").exists)
    cluster.run("scontrol", "requeue", job_id)
    state = cluster.wait("the requeued job's end", lambda: (s := cluster.job(job_id))["JobState"] in ENDED and s)
    log = (run_dir / "slurm-0.out").read_text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log[-4000:]
    stage, step = assert_saved_then_resumed(log, "SIGTERM", run_dir)
    assert stage == "align" and 3 <= step < STEPS  # requeued after the first checkpoint (step 3)
    assert_ends_like(json.loads((run_dir / "summary.json").read_text()), reference)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").samefile(checkpoints / "stage1-kl.ckpt")


def test_launcher_job_at_its_time_limit_saves_is_requeued_and_ends_like_an_uninterrupted_run(cluster, job, tmp_path):
    """submitit arms USR2 signal_delay_s = 100 s before the limit. Once the job trains, its limit is cut
    to 2 minutes after its start: SLURM sends USR2 at its next time-limit check (every 30 s)."""
    overrides, reference = job
    launcher = subprocess.Popen(
        [sys.executable, "-m", "distill.train", "-m", *LAUNCHER, "hydra.launcher.signal_delay_s=100",
         "hydra.launcher.max_num_timeout=3", f"paths.log_dir={tmp_path}/outputs", *overrides],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        multirun = tmp_path / "outputs" / "multirun"
        cluster.wait("the first checkpoint", lambda: list(multirun.glob("*/0/checkpoints/last.ckpt")))
        (job_id,) = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=2")
        cluster.wait("the requeue at the time limit", lambda: cluster.job(job_id)["Restarts"] == "1", timeout=120)
        cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")  # the rerun may finish
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    (run_dir,) = multirun.glob("*/0")  # the sweep dir was resolved once, when the job was submitted
    log = "".join(p.read_text() for p in sorted(run_dir.parent.glob(f".submitit/{job_id}/*_log.*")))
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log  # submitit's part
    stage, step = assert_saved_then_resumed(log, "SIGUSR2", run_dir)
    assert stage == "kl" or step > 3  # the signal came after the first checkpoint (align, step 3)
    assert_ends_like(json.loads((run_dir / "summary.json").read_text()), reference)


def test_a_two_value_sweep_through_the_launcher_is_two_jobs_with_two_summaries(cluster, stdlib_teacher, corpus,
                                                                              tmp_path):
    overrides = [o for o in job_overrides(stdlib_teacher, corpus, tmp_path / "cache", steps=4, every=2)
                 if not o.startswith("stages.1.lr=")]
    result = subprocess.run(
        [sys.executable, "-m", "distill.train", "-m", "debug=smoke", *LAUNCHER, f"hydra.sweep.dir={tmp_path}/sweep",
         *overrides, "stages.1.lr=1e-3,4e-3"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = tmp_path / "sweep"
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    for i, lr in enumerate((1e-3, 4e-3)):
        assert OmegaConf.load(sweep / str(i) / ".hydra" / "config.yaml").stages[1].lr == lr
        assert (sweep / str(i) / "checkpoints" / "last.ckpt").is_file()
    (align_0, kl_0), (align_1, kl_1) = ([s["final_loss"] for s in summary["stages"]] for summary in summaries)
    assert align_0 == pytest.approx(align_1, rel=1e-6) and kl_0 != pytest.approx(kl_1, rel=1e-3)
    (first,) = [p.name for p in sweep.glob(".submitit/*_0")]
    array = first.removesuffix("_0")
    tasks = cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", array).stdout.split()
    assert sorted(tasks) == [f"{array}_0|COMPLETED", f"{array}_1|COMPLETED"]
