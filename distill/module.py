"""The LightningModule of a distillation job: a frozen teacher, a student, one stage at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import Tensor, nn

from distill.losses import head_weight, l2_alignment, linear_kl
from distill.stages import Stage
from models.teacher import FrozenTeacher


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; checkpoints already written are left as they are."""


class DistillModule(L.LightningModule):
    """Trains `student` against `teacher` for the current stage (`set_stage`).

    The teacher is kept OUTSIDE the module tree on purpose: it is never in the optimizer,
    never in a checkpoint, never wrapped or sharded by a strategy. `on_fit_start` moves it to
    the student's device; its dtype is chosen when it is loaded.
    """

    def __init__(self, teacher: FrozenTeacher, student: nn.Module,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 kl_chunk_tokens: int = 1024, run_config: dict | None = None):
        super().__init__()
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        self.student = student
        self.optimizer_factory = optimizer
        self.kl_chunk_tokens = kl_chunk_tokens
        self.stage: Stage | None = None
        self.stage_index = -1
        self.total_steps = 1
        self.last_loss = float("nan")
        self.run_config = run_config or {}  # how to rebuild teacher and student (distill-eval)
        self.finished_stages: list[dict] = []  # summary records of the stages done so far
        self._step_started = 0.0

    # ----- stage set-up -------------------------------------------------------------
    def set_stage(self, index: int, stage: Stage, total_steps: int) -> None:
        """Select what trains and how long the LR schedule runs."""
        self.stage, self.stage_index, self.total_steps = stage, index, total_steps
        self.student.requires_grad_(stage.trainable == "all")
        if stage.trainable != "all":
            chosen = {"time_mix": self.student.time_mix_parameters, "new": self.student.new_parameters}
            for p in chosen[stage.trainable]():
                p.requires_grad_(True)

    def configure_optimizers(self):
        stage = self.stage
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, lr=stage.lr, weight_decay=stage.weight_decay)
        warmup = int(stage.warmup_fraction * self.total_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.total_steps, warmup, stage.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        # Lightning keeps each submodule's mode; parts copied from the eval-mode teacher (rotary_emb)
        # would otherwise stay in eval mode, and evaluation leaves the student in eval mode too.
        self.student.train()

    # ----- losses -------------------------------------------------------------------
    def stage_loss(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The current stage's loss and its parts; input_ids, labels: [B, T]."""
        teacher_out = self.teacher(input_ids)
        if self.stage.loss == "align":
            outputs = self.student.time_mix_outputs(teacher_out.attn_inputs)
            per_layer = torch.stack([l2_alignment(t, s) for t, s in zip(teacher_out.attn_outputs, outputs)])
            # Per-layer errors show which layers resist conversion (candidates for attention_layers).
            layers = {f"align_layer{i}": e.detach() for i, e in enumerate(per_layer)}
            return {"loss": per_layer.mean(), "align": per_layer.mean().detach(), **layers}
        student_out = self.student(input_ids)
        stage = self.stage
        # out.loss = KL + (ce_weight / kl_weight) CE, so kl_weight * out.loss weighs both as configured.
        out = linear_kl(student_out.last_hidden, head_weight(self.student.lm_head),
                        teacher_out.last_hidden, head_weight(self.teacher.lm_head), labels=labels,
                        temperature=stage.temperature, kind=stage.kind, beta=stage.beta,
                        ce_weight=stage.ce_weight / stage.kl_weight, chunk_tokens=self.kl_chunk_tokens)
        hidden = torch.stack([l2_alignment(t, s) for t, s in
                              zip(teacher_out.hidden_states, student_out.hidden_states)]).mean()
        loss = stage.kl_weight * out.loss + stage.hidden_weight * hidden
        return {"loss": loss, "kl": out.kl, "hidden": hidden.detach(), "ce": out.student_nll,
                "top1": out.top1}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self.stage_loss(batch["input_ids"], batch["labels"])
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"stage {self.stage.name!r}: loss is {loss.item()} at step {self.global_step}; "
                f"checkpoints already written are intact. Lower stages[{self.stage_index}].lr "
                f"(now {self.stage.lr}) or check the teacher's outputs for NaN")
        self.last_loss = loss.item()
        self.log_dict({f"{self.stage.name}/{k}": v for k, v in parts.items()}, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    # ----- throughput ---------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._step_started
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("tok/s", tokens / max(seconds, 1e-9), prog_bar=True, logger=True)

    # ----- checkpoints --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distill"] = {"stage_index": self.stage_index, "stage_name": self.stage.name,
                                 "last_loss": self.last_loss, "finished_stages": self.finished_stages,
                                 "config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.last_loss = checkpoint["distill"]["last_loss"]
