"""conf/hydra/launcher/{slurm,local}.yaml: the SLURM launcher follows the trainer's layout, and the
local launcher runs a job through submitit on this machine (tests/slurm runs the SLURM one)."""

from __future__ import annotations

import json
import subprocess
import sys

from hydra import compose, initialize_config_dir

from tests.distill.helpers import REPO, job_overrides


def test_slurm_launcher_asks_for_one_task_per_device_on_every_node():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0  # requeued at the time limit


def test_local_launcher_runs_a_job_into_its_sweep_dir(stdlib_teacher, corpus, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distill.train", "-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}/sweep",
         *job_overrides(stdlib_teacher, corpus, tmp_path / "cache", steps=2, every=2)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert summary["tokens_seen"] == 2 * 2 * 4 * 32  # stages x steps x batch x seq_len
    assert (tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # it ran under submitit
