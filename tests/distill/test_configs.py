"""Every config group option composes; every experiment composes; the CLI prints a composed job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from distill.stages import stages_from_config
from distill.tracking import make_loggers
from tests.distill.helpers import REPO, compose_train

CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [(group.name, p.stem) for group in sorted(CONF.iterdir()) if group.is_dir()
                 and group.name not in ("experiment", "hydra") for p in sorted(group.glob("*.yaml"))]
HUB_PRESETS = {
    "qwen2.5-0.5b_rad-rwkv7": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b_rad-rwkv7": "Qwen/Qwen2.5-7B",
    "llama-3.2-1b_rad-rwkv7": "meta-llama/Llama-3.2-1B",
    "qwen3-0.6b_rad-rwkv7": "Qwen/Qwen3-0.6B",
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_valid_stages(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path / "run", tmp_path / "cache")
    stages = stages_from_config([dict(s) for s in cfg.stages])
    assert stages and stages[0].loss == "align"
    assert cfg.teacher.path


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("teacher", "hf"):
        overrides.append("teacher.path=org/model")
    if (group, option) == ("data", "text"):
        overrides.append("data.source.paths=[a.txt]")
    cfg = compose_train(overrides, tmp_path / "run", tmp_path / "cache")
    assert group in cfg or group in ("debug", "stages", "paths")


def test_training_machinery_instantiates(tmp_path):
    cfg = compose_train(["debug=smoke"], tmp_path / "run", tmp_path / "cache")
    trainer = instantiate(cfg.trainer, precision="32-true", logger=make_loggers(cfg),
                          callbacks=list(instantiate(cfg.callbacks).values()))
    assert trainer.accumulate_grad_batches == 1 and trainer.gradient_clip_val == 1.0
    assert instantiate(cfg.optim)  # a partial AdamW
    assert cfg.max_steps_per_stage == 20


@pytest.mark.parametrize("experiment, hub_id", sorted(HUB_PRESETS.items()))
def test_hub_presets_print_with_cfg_job(experiment, hub_id):
    """`distill-train experiment=... --cfg job` composes without touching the hub."""
    result = subprocess.run([sys.executable, "-m", "distill.train", f"experiment={experiment}", "--cfg", "job"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"path: {hub_id}" in result.stdout
    assert "name: finetune" in result.stdout


@pytest.mark.parametrize("script, args", [("distill-train", ["--cfg", "job"]),
                                          ("distill-eval", ["ckpt=x.ckpt", "text=x.txt", "--cfg", "job"]),
                                          ("distill-export", ["ckpt=x.ckpt", "out=x", "--cfg", "job"])])
def test_console_scripts_find_their_configs_from_any_directory(script, args, tmp_path):
    executable = Path(sys.executable).parent / script
    if not executable.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable} (pip install -e .)")
    result = subprocess.run([str(executable), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "seed:" in result.stdout or "ckpt: x.ckpt" in result.stdout
