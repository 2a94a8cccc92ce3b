"""The LightningModule of a distillation job: a frozen teacher, a student, one stage at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import Tensor, nn

from distill.lora import Adapters
from distill.losses import head_weight, l2_alignment, linear_kl
from distill.parallel import declare_external_parameters, deepspeed_grad_norm, uses_deepspeed
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
                 kl_chunk_tokens: int = 1024, run_config: dict | None = None,
                 check_finite_every_n_steps: int = 1,
                 teacher_sharding: Callable[..., None] | None = None):
        super().__init__()
        if check_finite_every_n_steps < 1:
            raise ValueError(f"check_finite_every_n_steps={check_finite_every_n_steps} must be >= 1")
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        self.student = student
        self.optimizer_factory = optimizer
        self.kl_chunk_tokens = kl_chunk_tokens
        self.stage: Stage | None = None
        self.stage_index = -1
        self.total_steps = 1
        self.check_finite_every_n_steps = check_finite_every_n_steps
        self.teacher_sharding = teacher_sharding  # shards the teacher once the ranks are up (parallel.py)
        self.final_loss = float("nan")  # the stage's last loss, averaged over ranks (on_train_end)
        self.run_config = run_config or {}  # how to rebuild teacher and student (distill-eval)
        self.finished_stages: list[dict] = []  # summary records of the stages done so far
        self.adapters: Adapters | None = None  # the current stage's LoRA adapters, in the student until merged
        self._reset_loss_record()

    def _reset_loss_record(self) -> None:
        # On the device, so that a step reads nothing back: the last loss, and the first non-finite
        # loss with its step (step -1: none yet).
        self._last_loss: Tensor | None = None
        self._bad: tuple[Tensor, Tensor] | None = None
        self._grad_norm: Tensor | None = None
        self._window: tuple[float, int] | None = None  # (clock, tokens) at the last tok/s reading

    # ----- stage set-up -------------------------------------------------------------
    def set_stage(self, index: int, stage: Stage, total_steps: int) -> None:
        """Select what trains and how long the LR schedule runs. A LoRA stage first injects its
        adapters; then the `trainable` group trains, except the Linear layers LoRA wraps, whose
        adapters train instead (distill/stages.py: TRAINABLE)."""
        assert self.adapters is None, "the previous stage's adapters were not merged"
        self.stage, self.stage_index, self.total_steps = stage, index, total_steps
        if stage.lora is not None:
            self.adapters = Adapters(self.student, stage.lora)
        self.student.requires_grad_(stage.trainable == "all")
        groups = {"time_mix": self.student.time_mix_parameters, "new": self.student.new_parameters,
                  "state": self.student.initial_state_parameters}  # all: set above; none: adapters only
        if stage.trainable in groups:
            for p in groups[stage.trainable]():
                p.requires_grad_(True)
        if self.adapters is not None:
            for p in self.adapters.base_parameters():
                p.requires_grad_(False)
            for p in self.adapters.parameters():
                p.requires_grad_(True)

    def merge_adapters(self) -> None:
        """The end of a LoRA stage: its adapters folded into the student's weights (peft's merge)."""
        if self.adapters is not None:
            self.adapters.merge()
            self.adapters = None

    def configure_optimizers(self):
        stage = self.stage
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, lr=stage.lr, weight_decay=stage.weight_decay)
        warmup = int(stage.warmup_fraction * self.total_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.total_steps, warmup, stage.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        self._reset_loss_record()
        if self.teacher_sharding is not None:
            self.teacher_sharding(self.teacher.model, device=self.device)  # in place, once: it stays partitioned
            self.teacher_sharding = None
        elif not getattr(self.teacher.model, "ds_sharded", False):
            self.teacher.to(self.device)
        declare_external_parameters(self, [self.student.lm_head.weight])
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
        out = linear_kl(student_out.last_hidden, head_weight(self.student.lm_head),
                        teacher_out.last_hidden, head_weight(self.teacher.lm_head), labels=labels,
                        temperature=stage.temperature, kind=stage.kind, beta=stage.beta,
                        kl_weight=stage.kl_weight, ce_weight=stage.ce_weight, chunk_tokens=self.kl_chunk_tokens)
        hidden = torch.stack([l2_alignment(t, s) for t, s in
                              zip(teacher_out.hidden_states, student_out.hidden_states)]).mean()
        loss = out.loss + stage.hidden_weight * hidden
        return {"loss": loss, "kl": out.kl, "hidden": hidden.detach(), "ce": out.student_nll,
                "top1": out.top1}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self.stage_loss(batch["input_ids"], batch["labels"])
        loss = parts["loss"]
        self._record_loss(loss.detach())
        if (self.global_step + 1) % self.check_finite_every_n_steps == 0:
            self.check_finite()
        self.log_dict({f"{self.stage.name}/{k}": v for k, v in parts.items()}, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def _record_loss(self, loss: Tensor) -> None:
        step = torch.full_like(loss, self.global_step)
        if self._bad is None:
            self._bad = (torch.full_like(loss, float("nan")), torch.full_like(loss, -1))
        bad_loss, bad_step = self._bad
        first = ~torch.isfinite(loss) & (bad_step < 0)
        self._bad = (torch.where(first, loss, bad_loss), torch.where(first, step, bad_step))
        self._last_loss = loss

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if any loss so far was NaN/inf: the one host read-back of the check,
        made every check_finite_every_n_steps steps, before every checkpoint and at the stage end."""
        if self._bad is None:
            return
        bad_loss, bad_step = (t.item() for t in self._bad)
        if bad_step >= 0:
            raise NonFiniteLossError(
                f"stage {self.stage.name!r}: loss is {bad_loss} at step {int(bad_step)}; checkpoints already "
                f"written are intact. Lower stages[{self.stage_index}].lr (now {self.stage.lr}) or check the "
                "teacher's outputs for NaN")

    def on_train_end(self) -> None:
        self.check_finite()
        if self._last_loss is not None:
            self.final_loss = self.trainer.strategy.reduce(self._last_loss, reduce_op="mean").item()

    # ----- what is logged besides the losses ----------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the global norm here: Lightning's mixed-precision plugin refuses to clip for a fused
        optimizer even in bf16, where nothing needs unscaling. The norm (before clipping, the same on
        every DDP rank) is the logged grad_norm. Under DeepSpeed the engine clips (trainer's
        gradient_clip_val goes into its config), this sees no gradients, and the engine reports the norm."""
        grads = [p for p in self.student.parameters() if p.grad is not None]
        if grads:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(grads, gradient_clip_val or float("inf"))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        norm = deepspeed_grad_norm(self.trainer) if uses_deepspeed(self.trainer) else self._grad_norm
        if norm is not None:
            self.log("grad_norm", norm, logger=True)
        self._log_throughput(batch["input_ids"].numel() * self.trainer.world_size)

    def _log_throughput(self, tokens: int) -> None:
        """tok/s over the steps since the last reading, every log_every_n_steps steps. A window, not a
        step: with no read-back per step the host runs ahead of the GPU, and only a window's clock is true."""
        now = time.perf_counter()
        if self._window is None:
            self._window = (now, 0)
            return
        started, seen = self._window
        seen += tokens
        if self.global_step % self.trainer.log_every_n_steps == 0:
            if self.on_gpu:
                torch.cuda.synchronize(self.device)  # once per window
                now = time.perf_counter()
            self.log("tok/s", seen / max(now - started, 1e-9), prog_bar=True, logger=True)
            self._window = (now, 0)
        else:
            self._window = (started, seen)

    # ----- checkpoints --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # a NaN run writes no checkpoint: the last good one stays
        last = self.final_loss if self._last_loss is None else self._last_loss.item()
        checkpoint["distill"] = {"stage_index": self.stage_index, "stage_name": self.stage.name,
                                 "last_loss": last, "finished_stages": self.finished_stages,
                                 "config": self.run_config,
                                 # the adapters in state_dict, to inject before restoring (distill/lora.py)
                                 "lora": None if self.adapters is None else self.adapters.spec.record()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a stage resumed at its last step trains no more: its final loss is the recorded one
        self.final_loss = checkpoint["distill"]["last_loss"]
