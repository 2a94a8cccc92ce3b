"""`distill-train`: distill a transformer teacher into an RWKV student, stage by stage.

    distill-train                                  # the quickstart (experiment=quickstart)
    distill-train experiment=stories260k debug=smoke
    distill-train ... ckpt_path=last               # resume this run dir's last checkpoint
    distill-train -m hydra/launcher=slurm ...      # submit to SLURM (README: SLURM)

`train(cfg)` does the work and returns the summary dict, so tests call it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill import tracking
from distill.checkpointing import save_stage_end
from distill.checkpoints import read_checkpoint
from distill.cli import CONF_DIR, register_resolvers, run_cli, summary_table
from distill.evaluation import compare_on_batches, continuations
from distill.module import DistillModule
from distill.parallel import resolve_precision, teacher_dtype
from distill.preemption import handles_preemption, resume_path
from distill.stages import Stage, stages_from_config
from models.diagnostics import alignment_errors
from models.student import StudentConfig, build_student
from models.teacher import FrozenTeacher


def find_resume(ckpt_path: str | None, run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(checkpoint to resume, its record and Lightning keys; no ZeRO weights gathered); ckpt_path:
    null, 'last', 'auto' or a path, and a requeued SLURM job resumes by itself (preemption.resume_path)."""
    path = resume_path(ckpt_path, run_dir)
    return (path, read_checkpoint(path, weights=False)) if path else (None, {})


def build_models(cfg: DictConfig, precision: str):
    """Frozen teacher (+ its tokenizer) and the student initialized from it."""
    teacher_model, tokenizer = instantiate(cfg.teacher, dtype=teacher_dtype(precision))
    student = build_student(teacher_model, StudentConfig(**OmegaConf.to_container(cfg.student)))
    return FrozenTeacher(teacher_model), tokenizer, student


def make_data(cfg: DictConfig, tokenizer, teacher: FrozenTeacher, seq_len: int, batch_size: int,
              stage_index: int = 0):
    # Each stage draws its own seeded order, so a later stage does not replay the first one's batches.
    return instantiate(cfg.data, tokenizer=tokenizer, teacher=teacher.model, seq_len=seq_len,
                       batch_size=batch_size, seed=cfg.seed + stage_index)


def fit_stage(cfg: DictConfig, module: DistillModule, index: int, stage: Stage, data, logger,
              precision: str, resume: Path | None) -> dict[str, Any]:
    """One Trainer.fit for one stage; returns the stage record for the summary."""
    trainer = instantiate(cfg.trainer, precision=precision, logger=logger,
                          callbacks=list(instantiate(cfg.callbacks).values()),
                          default_root_dir=cfg.paths.output_dir)
    steps = stage.steps(trainer.world_size, trainer.accumulate_grad_batches, cfg.max_steps_per_stage)
    # The budget depends on the world size, which only the built Trainer knows for sure.
    trainer.fit_loop.epoch_loop.max_steps = steps
    module.set_stage(index, stage, steps)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - started
    record = {"name": stage.name, "loss": stage.loss, "steps": steps,
              "tokens": steps * stage.tokens_per_step(trainer.world_size, trainer.accumulate_grad_batches),
              "final_loss": module.last_loss, "seconds": seconds}
    module.finished_stages.append(record)
    save_stage_end(trainer, Path(cfg.paths.output_dir) / "checkpoints" / f"stage{index}-{stage.name}.ckpt")
    return record


@handles_preemption
@tracking.finishes_wandb_runs
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of the job, evaluate, write summary.json; return the summary."""
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    teacher, tokenizer, student = build_models(cfg, precision)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = DistillModule(teacher, student, instantiate(cfg.optim), kl_chunk_tokens=cfg.kl_chunk_tokens,
                           run_config={k: run_config[k] for k in ("teacher", "student", "data", "seed")})
    stages = stages_from_config(OmegaConf.to_container(cfg.stages, resolve=True))
    resume, checkpoint = find_resume(cfg.ckpt_path, run_dir)
    if resume:
        module.finished_stages = list(checkpoint["distill"]["finished_stages"])
    done = {s["name"] for s in module.finished_stages}
    if resume and checkpoint["distill"]["stage_name"] in done:
        # A stage-end checkpoint: no Trainer restores it (the next stage starts fresh), so its weights
        # go in here. A mid-stage checkpoint is restored whole by Trainer.fit(ckpt_path=...).
        module.load_state_dict(read_checkpoint(resume)["state_dict"])
    logger = tracking.make_loggers(cfg) or False

    for index, stage in enumerate(stages):
        if stage.name in done:
            continue
        data = make_data(cfg, tokenizer, teacher, stage.seq_len, stage.batch_size, index)
        same_stage = resume is not None and checkpoint["distill"]["stage_index"] == index
        fit_stage(cfg, module, index, stage, data, logger, precision, resume if same_stage else None)

    summary = summarize(cfg, module, teacher, tokenizer, student, started)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(summary_table(summary))
        tracking.log_summary(logger or [], summary)
    return summary


def summarize(cfg: DictConfig, module: DistillModule, teacher, tokenizer, student, started: float) -> dict:
    device = next(student.parameters()).device
    teacher.to(device)
    student.eval()
    eval_data = make_data(cfg, tokenizer, teacher, cfg.evaluation.seq_len, cfg.evaluation.batch_size)
    batches = eval_data.heldout_batches()
    metrics = compare_on_batches(teacher, student, batches, cfg.kl_chunk_tokens)
    stages = module.finished_stages
    tokens = sum(s["tokens"] for s in stages)
    train_seconds = sum(s["seconds"] for s in stages)
    return {
        **metrics,
        "tokens_seen": tokens,
        "wall_seconds": time.time() - started,
        "tokens_per_second": tokens / max(train_seconds, 1e-9),
        "stages": stages,
        "alignment_errors": alignment_errors(teacher, student, batches[0]["input_ids"].to(device)),
        "continuation": continuations(teacher, student, tokenizer, cfg.evaluation.prompt,
                                      cfg.evaluation.max_new_tokens),
    }


register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run_cli(train, cfg)


if __name__ == "__main__":
    main()
