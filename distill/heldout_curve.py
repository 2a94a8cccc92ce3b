"""Held-out metrics during training: the curve of student NLL, KL and top-1 vs tokens seen.

Off unless `evaluation.every_n_steps` is set (conf/callbacks/default.yaml wires this callback to
the evaluation settings). The same held-out tokens are measured each time, so points compare.
"""

from __future__ import annotations

import lightning as L
import torch

from distill.evaluation import compare_on_batches
from distill.parallel import uses_deepspeed

LOGGED = ("student_nll", "teacher_nll", "kl", "top1_agreement")


class HeldoutCurve(L.Callback):
    """Evaluates the student at each stage's start and end and every `every_n_steps` optimizer
    steps on the first `max_tokens` held-out tokens in windows of `seq_len`, and logs
    val/{student_nll, teacher_nll, kl, top1_agreement} with val/tokens (training tokens seen so far,
    over all stages and ranks) to the run's loggers (logs/metrics.csv). every_n_steps None: off."""

    def __init__(self, every_n_steps: int | None, seq_len: int, batch_size: int, max_tokens: int) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"evaluation.every_n_steps={every_n_steps} must be >= 1 (or null: off)")
        self.every_n_steps, self.seq_len = every_n_steps, seq_len
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self._batches: list | None = None
        self._last: tuple[int, int] | None = None  # (stage index, step) last evaluated

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps and uses_deepspeed(trainer):
            raise ValueError("evaluation.every_n_steps evaluates the student in place, which a DeepSpeed strategy "
                             "shards; use strategy=auto or ddp, or evaluation.every_n_steps=null")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._evaluate(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._evaluate(trainer, module)

    def tokens_seen(self, trainer: L.Trainer, module: L.LightningModule) -> int:
        done = sum(s["tokens"] for s in module.finished_stages)
        return done + trainer.global_step * module.stage.tokens_per_step(trainer.world_size,
                                                                         trainer.accumulate_grad_batches)

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.every_n_steps or not trainer.is_global_zero:
            return
        point = (module.stage_index, trainer.global_step)
        if point == self._last:
            return
        if self._batches is None:
            self._batches = trainer.datamodule.heldout_batches(self.batch_size, self.seq_len, self.max_tokens)
        module.student.eval()
        with torch.compiler.set_stance("force_eager"), trainer.precision_plugin.forward_context():
            metrics = compare_on_batches(module.teacher, module.student, self._batches, module.kl_chunk_tokens)
        module.student.train()
        values = {f"val/{k}": metrics[k] for k in LOGGED} | {"val/tokens": self.tokens_seen(trainer, module)}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        self._last = point
