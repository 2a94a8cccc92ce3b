"""Stopping early and coming back: signals become a checkpoint (and on SLURM a requeue), and a
requeued job finds the checkpoint by itself.

- SIGTERM (`scancel`, `scontrol requeue`, preemption, a plain `kill`): the job writes last.ckpt at
  the end of the current optimizer step and exits with status 143.
- SIGUSR1 / SIGUSR2, the warning before the time limit (jobs/slurm/distill.sbatch arms USR1,
  hydra-submitit-launcher USR2): the same checkpoint, then the job requeues itself and exits.
  Under submitit, submitit's own USR2 handler does the requeue (it pickles the job and runs
  `scontrol requeue`), called only once the checkpoint is on disk; otherwise `scontrol requeue`
  runs here. Lightning's own handlers are set aside: its SLURM auto-requeue saves from inside the
  signal handler, mid-step, to a file of its own; its SIGTERM handling stops after the step
  without a checkpoint, with exit status 0.

During training a signal is only noted; `Preemption` (a callback) acts at the next step
boundary, where ModelCheckpoint saves too, so a resumed run restarts exactly there. Outside
training (data preparation, evaluation, between stages) nothing is newer than the last
checkpoint, and the job acts at once. Every rank receives the signals under srun; the ranks
agree at the step boundary, so they stop together.

A requeued job (SLURM_RESTART_COUNT ≥ 1) resumes from its run dir's last checkpoint
(`resume_path`); the run dir stays the same because the sbatch template derives it from the job
id and the launcher resolves it when it submits.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from distill.checkpointing import LastCheckpoint, find_last

log = logging.getLogger("distill")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
RESUME_CHOICES = "null (start fresh), 'last' (this run dir's), 'auto' (last if there is one) or a checkpoint path"


class _Guard:
    """The job's signal handlers (signals are per process, so there is one guard at a time)."""

    # The running job's guard. A class attribute, not a module global: submitit pickles a job
    # started as `python -m distill.train` by value, and a by-value function's globals are a copy.
    current: ClassVar[_Guard | None] = None

    def __init__(self) -> None:
        self.received: int | None = None
        self.in_training = False
        self.leaving = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take the signals (again: Trainer.fit puts its own SIGTERM handler in front of ours)."""
        for signum in SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.leaving:  # e.g. the SIGTERM that follows our own requeue
            return
        self.received = self.received or signum
        when = "at the end of this step" if self.in_training else "now"
        log.warning("received %s: saving and stopping %s", signal.Signals(signum).name, when)
        if not self.in_training:
            self.leave()

    def leave(self) -> None:
        """Requeue the job when the signal asks for it (SLURM), then exit with 128 + the signal."""
        self.leaving = True
        signum = self.received or signal.SIGTERM
        if signum != signal.SIGTERM:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, None)  # submitit's: requeues and exits on rank 0, returns elsewhere
            elif "SLURM_JOB_ID" in os.environ and rank_zero_only.rank == 0:
                requeue_slurm_job()
        raise SystemExit(128 + signum)


def handles_preemption(job: Callable[..., Any]) -> Callable[..., Any]:
    """Run `job` with the signal handlers installed (restored afterwards)."""

    @functools.wraps(job)
    def guarded(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return job(*args, **kwargs)  # handlers can only be set from the main thread
        guard = _Guard.current = _Guard()
        guard.install()
        try:
            return job(*args, **kwargs)
        finally:
            guard.restore()
            _Guard.current = None

    return guarded


class Preemption(L.Callback):
    """Acts on a noted signal at the step boundary: last.ckpt, then requeue/exit (module docstring)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if _Guard.current is not None:
            # Lightning's SIGTERM handler would end the loop after the step without a checkpoint
            # (and with exit status 0); ours alone saves. Fit's end puts ours back anyway.
            _Guard.current.install()
            _Guard.current.in_training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not _noted(trainer):
            return
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, LastCheckpoint):
            checkpoint.save_now(trainer)
            log.warning("saved %s at step %d of stage %r", Path(checkpoint.dirpath) / "last.ckpt",
                        trainer.global_step, pl_module.stage.name)
        else:
            log.warning("no LastCheckpoint callback: stopping without a checkpoint")
        _Guard.current.leave()

    def on_train_end(self, trainer, pl_module) -> None:
        if _Guard.current is None:
            return
        _Guard.current.in_training = False
        if _noted(trainer):  # came after the last step's boundary: the stage's tail is redone on resume
            _Guard.current.leave()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if _Guard.current is not None:
            _Guard.current.in_training = False


def _noted(trainer) -> bool:
    """Whether any rank has noted a signal (all ranks call this at the same point)."""
    if _Guard.current is None:
        return False
    noted = _Guard.current.received is not None
    if trainer.world_size > 1:
        noted = trainer.strategy.reduce_boolean_decision(noted, all=False)
    return noted


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (this task of an array)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job_id)
    else:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())


def slurm_restarts() -> int:
    """How often SLURM has requeued this job (0 on its first run, and outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0))


def resume_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The checkpoint this run resumes from (None: start fresh).

    ckpt_path: null (fresh), "last" (checkpoints/last.ckpt of run_dir: must exist), "auto"
    (last.ckpt when there is one, else fresh), or a checkpoint path. A requeued SLURM job takes its
    own run dir's last checkpoint whenever there is one, whatever ckpt_path says, since the job
    has progressed beyond the checkpoint it was started from.
    """
    last = find_last(run_dir / "checkpoints")
    if slurm_restarts() and last is not None:
        log.info("requeued SLURM job (restart %d): resuming from %s", slurm_restarts(), last)
        return last
    if ckpt_path is None or ckpt_path == "auto":
        return last if ckpt_path == "auto" else None
    if ckpt_path == "last":
        if last is None:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}; set hydra.run.dir to "
                f"the run dir that holds it, or use ckpt_path=auto to start fresh when there is none")
        return last
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no checkpoint at {path}; give {RESUME_CHOICES}")
    return path
