"""The job under DeepSpeed ZeRO-2 / ZeRO-3 on one GPU (marked gpu: Lightning's DeepSpeed strategy
runs on CUDA only), against the auto strategy: each finishes, resumes a mid-stage checkpoint to the
same final step and loss, evaluates, and trains to the same losses within bf16 tolerance.

DeepSpeed keeps bf16 weights with fp32 master copies, the auto strategy fp32 weights under bf16
autocast: the two round differently from the first step, so they agree to bf16 tolerance (the
bounds below), while a resumed run repeats its own strategy's numbers (tight bounds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.checkpoints import read_checkpoint
from distill.train import train
from tests.distill.helpers import compose_tiny_job
from tests.distill.test_train import CrashAtStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU = ["trainer.accelerator=gpu", "runtime.compile=false", "callbacks.model_checkpoint.every_n_train_steps=4"]
STEPS = 8


def job(tiny_teacher, run: Path, cache: Path, strategy: str, extra: list[str] = ()) -> dict:
    return train(compose_tiny_job(tiny_teacher, run, cache, steps=STEPS,
                                  extra=[*GPU, f"strategy={strategy}", *extra]))


@pytest.fixture(scope="module")
def auto_run(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    return job(tiny_teacher, root / "run", root / "cache", "auto")


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_runs_resume_and_match_the_auto_strategy(strategy, auto_run, tiny_teacher, tmp_path):
    full = job(tiny_teacher, tmp_path / "full", tmp_path / "cache", strategy)
    # the stage-end record is consolidated from the ZeRO shards: fp32 weights of the whole student
    record = read_checkpoint(tmp_path / "full" / "checkpoints" / "stage1-kl.ckpt")
    assert record["state_dict"] and all(v.dtype == torch.float32 for v in record["state_dict"].values())
    for a, b in zip(auto_run["stages"], full["stages"], strict=True):
        assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=5e-2, abs=2e-3), (strategy, a, b)
    assert full["student_ppl"] == pytest.approx(auto_run["student_ppl"], rel=2e-2)

    run = tmp_path / "interrupted"
    crash = [f"+callbacks.crash._target_={CrashAtStep.__module__}.CrashAtStep", "+callbacks.crash.stage=kl",
             "+callbacks.crash.step=5"]
    with pytest.raises(RuntimeError, match="simulated preemption"):
        job(tiny_teacher, run, tmp_path / "cache", strategy, crash)
    resumed = job(tiny_teacher, run, tmp_path / "cache", strategy, ["ckpt_path=last"])
    for a, b in zip(full["stages"], resumed["stages"], strict=True):
        assert (a["name"], a["steps"]) == (b["name"], b["steps"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-3, abs=1e-5), (strategy, a, b)
    assert resumed["student_ppl"] == pytest.approx(full["student_ppl"], rel=1e-3)
