"""Test callbacks that break a job at one chosen moment: a signal to its own process (run as a
subprocess: `+callbacks.interrupt._target_=tests.distill.interrupts.Interrupt ...`) or NaN
weights; and one that slows it down, so that a cluster's signal finds it training."""

from __future__ import annotations

import json
import os
import signal as signal_module
import time
from pathlib import Path

import lightning as L
import torch

MOMENTS = ("start", "step", "write")


class Interrupt(L.Callback):
    """Sends `signal` to this process when stage `stage` reaches global step `step`, at `moment`:
    "start" (the stage's Trainer starts training), "step" (inside that step: after its backward,
    before its optimizer step), or "write" (while the checkpoint of that step is being written).
    `note`: a file that receives the moment's wall time, stage and step just before the signal;
    `rank`: only that global rank signals itself (None: every rank)."""

    def __init__(self, stage: str, step: int, moment: str, signal: str = "SIGKILL", note: str | None = None,
                 rank: int | None = None):
        if moment not in MOMENTS:
            raise ValueError(f"moment={moment!r} is not one of {MOMENTS}")
        self.stage, self.step, self.moment, self.note, self.rank = stage, step, moment, note, rank
        self.signum = int(getattr(signal_module, signal))

    def _here(self, trainer, pl_module, moment: str) -> bool:
        return (moment == self.moment and pl_module.stage.name == self.stage
                and (moment == "start" or trainer.global_step == self.step)
                and self.rank in (None, trainer.global_rank))

    def fire(self, stage: str, step: int) -> None:
        if self.note:
            Path(self.note).write_text(json.dumps({"time": time.time(), "stage": stage, "step": step}))
        os.kill(os.getpid(), self.signum)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._here(trainer, pl_module, "start"):
            self.fire(self.stage, trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._here(trainer, pl_module, "step"):
            self.fire(self.stage, trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._here(trainer, pl_module, "write"):
            checkpoint["interrupt"] = _FireWhenPickled(self, trainer.global_step)


class _FireWhenPickled:
    """Fires its interrupt while torch.save serializes the checkpoint, i.e. mid-write."""

    def __init__(self, interrupt: Interrupt, step: int):
        self.interrupt, self.step = interrupt, step

    def __reduce__(self):
        self.interrupt.fire(self.interrupt.stage, self.step)
        return (dict, ())



class PoisonWeights(L.Callback):
    """Sets one student weight to NaN at the end of global step `step` of stage `stage`, before
    that step's checkpoint is written (Lightning runs checkpoint callbacks last)."""

    def __init__(self, stage: str, step: int):
        self.stage, self.step = stage, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.stage.name == self.stage and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.student.parameters()).view(-1)[0] = float("nan")


class Pace(L.Callback):
    """Sleeps `seconds` after every optimizer step (the numbers are those of an unpaced run)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        time.sleep(self.seconds)
