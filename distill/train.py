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
from functools import partial
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
from distill.cli import CONF_DIR, log, register_resolvers, run_cli, summary_table
from distill.evaluation import compare_on_batches, continuations
from distill.lora import load_student
from distill.module import DistillModule
from distill import hybrid, parallel
from distill.parallel import resolve_precision, teacher_dtype
from distill.preemption import handles_preemption, resume_path
from distill.stages import Stage, check_fits, stages_from_config
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
    teacher = FrozenTeacher(teacher_model)
    return teacher, tokenizer, build_student_from(cfg, teacher)


def make_data(cfg: DictConfig, tokenizer, teacher: FrozenTeacher, seq_len: int, batch_size: int,
              stage_index: int = 0):
    # Each stage draws its own seeded order, so a later stage does not replay the first one's batches.
    return instantiate(cfg.data, tokenizer=tokenizer, teacher=teacher.model, seq_len=seq_len,
                       batch_size=batch_size, seed=cfg.seed + stage_index)


def fit_stage(cfg: DictConfig, module: DistillModule, index: int, stage: Stage, data, logger,
              precision: str, resume: Path | None):
    """One Trainer.fit for one stage; returns (the stage record for the summary, the trainer)."""
    # the align loss runs no FFN: new FFNs, or adapters outside the time mixes, get no gradient there
    unused = stage.loss == "align" and (stage.lora is not None or
                                        (stage.trainable == "new" and cfg.student.ffn != "teacher"))
    trainer = instantiate(cfg.trainer, precision=precision, logger=logger,
                          strategy=parallel.lightning_strategy(cfg.strategy, unused_trainable=unused),
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
              "final_loss": module.final_loss, "seconds": seconds}
    module.finished_stages.append(record)
    save_stage_end(trainer, stage_end_path(cfg, index, stage))  # a LoRA stage's record keeps its adapters
    module.merge_adapters()
    return record, trainer


def stage_end_path(cfg: DictConfig, index: int, stage: Stage) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints" / f"stage{index}-{stage.name}.ckpt"


@handles_preemption
@tracking.finishes_wandb_runs
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage of the job, evaluate, write summary.json; return the summary."""
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    accelerator = cfg.trainer.accelerator
    precision = resolve_precision(cfg.trainer.precision, accelerator)
    stages = stages_from_config(OmegaConf.to_container(cfg.stages, resolve=True))  # bad stages fail before any load
    parallel.check_strategy(cfg.strategy, cfg.optim, lora_stages=[s.name for s in stages if s.lora is not None])
    parallel.configure_runtime(cfg.runtime, accelerator)
    resume, checkpoint = find_resume(cfg.ckpt_path, run_dir)
    auto = hybrid.plan(cfg, checkpoint)  # attention_layers=auto:K: all RWKV until the align stage ends
    teacher, tokenizer, student = build_models(cfg, precision)
    if auto:
        auto.check(student)
    if not cfg.strategy.shard_teacher:  # a sharded teacher may not fit one device: it is partitioned in fit
        teacher.to(parallel.process_device(accelerator))  # data-free sampling runs where the job trains
    choices = parallel.runtime_choices(cfg.runtime, accelerator, cfg.strategy)
    log.info("runtime: %s, strategy %s", choices, cfg.strategy.lightning)
    parallel.prepare_student(student, choices)
    parallel.prepare_teacher(teacher, choices)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = DistillModule(teacher, student, instantiate(cfg.optim), kl_chunk_tokens=cfg.kl_chunk_tokens,
                           run_config={k: run_config[k] for k in ("teacher", "student", "data", "seed")},
                           check_finite_every_n_steps=cfg.runtime.check_finite_every_n_steps,
                           teacher_sharding=partial(parallel.shard_teacher, precision=precision)
                           if cfg.strategy.shard_teacher else None)
    for stage in stages:
        check_fits(stage, student)
    if resume:
        module.finished_stages = list(checkpoint["distill"]["finished_stages"])
    done = {s["name"] for s in module.finished_stages}
    if resume and checkpoint["distill"]["stage_name"] in done:
        # A stage-end checkpoint: no Trainer restores it (the next stage starts fresh), so its weights
        # go in here. A mid-stage checkpoint is restored whole by Trainer.fit(ckpt_path=...).
        load_student(module.student, read_checkpoint(resume))
    logger = tracking.make_loggers(cfg) or False

    trained_with_deepspeed = False
    for index, stage in enumerate(stages):
        if stage.name in done:
            continue
        if auto and auto.due(index):
            heldout = make_data(cfg, tokenizer, teacher, cfg.evaluation.seq_len, cfg.evaluation.batch_size)
            student = auto.switch(cfg, module, teacher, heldout, choices, precision,
                                  stage_end_path(cfg, auto.after, stages[auto.after]))
        data = make_data(cfg, tokenizer, teacher, stage.seq_len, stage.batch_size, index)
        same_stage = resume is not None and checkpoint["distill"]["stage_index"] == index
        _, trainer = fit_stage(cfg, module, index, stage, data, logger, precision, resume if same_stage else None)
        trained_with_deepspeed = parallel.uses_deepspeed(trainer)

    if rank_zero_only.rank != 0:  # one process evaluates and writes the summary
        return {"stages": module.finished_stages}
    if trained_with_deepspeed:  # its student is sharded or cast in place: evaluate the consolidated fp32 one
        student = build_student_from(cfg, teacher)
        final = stage_end_path(cfg, len(stages) - 1, stages[-1])
        load_student(student, read_checkpoint(final))
    summary = summarize(cfg, module, teacher, tokenizer, student, started, precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(summary_table(summary))
    tracking.log_summary(logger or [], summary)
    return summary


def build_student_from(cfg: DictConfig, teacher: FrozenTeacher):
    """A student initialized from the teacher, as cfg.student says."""
    return build_student(teacher.model, StudentConfig(**OmegaConf.to_container(cfg.student)))


@torch.no_grad()
def summarize(cfg: DictConfig, module: DistillModule, teacher, tokenizer, student, started: float,
              precision: str) -> dict:
    """Held-out metrics on the training device, under the training precision, eagerly (compiled
    blocks would recompile for no_grad and one-token steps)."""
    device = parallel.process_device(cfg.trainer.accelerator)
    teacher.to(device)
    student.to(device).eval()
    eval_data = make_data(cfg, tokenizer, teacher, cfg.evaluation.seq_len, cfg.evaluation.batch_size)
    batches = eval_data.heldout_batches()
    with torch.compiler.set_stance("force_eager"), parallel.autocast(precision, device):
        return _summary(cfg, module, teacher, tokenizer, student, started, batches, device)


def _summary(cfg, module, teacher, tokenizer, student, started, batches, device) -> dict:
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
