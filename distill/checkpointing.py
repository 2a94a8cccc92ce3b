"""Writing checkpoints so that a job killed at any moment resumes: one place for every writer.

A run keeps one resumable checkpoint, checkpoints/last.ckpt (weights + optimizer + schedule +
step), replaced as training goes (every N steps on CPU presets, every 30 min on GPU presets:
conf/callbacks/), and one small record per finished stage, stage<i>-<name>.ckpt (weights and
the `distill` record, no optimizer state). At a stage end last.ckpt becomes a hard link to that
record, so a 0.5B student's finished run holds 2 GB per stage instead of 7.7 GB per checkpoint.

Atomic: a reader (a resumed run, distill-eval) always finds either the previous checkpoint or
the new one, whole. A file (strategies auto / ddp) is written beside its place as
<name>.partial-<pid>, fsynced, and renamed over the old one (`AtomicCheckpointIO`, optionally
inside Lightning's AsyncCheckpointIO). A DeepSpeed checkpoint is a directory that every rank
writes its shard into: it is written as <name>.partial, then swapped in by two renames
(old → <name>.old, new → <name>); a kill between the two leaves <name>.old, which
`find_last` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from distill.checkpoints import CheckpointError, read_checkpoint
from distill.module import NonFiniteLossError
from distill.parallel import uses_deepspeed  # DeepSpeed writes a directory of per-rank shards, ignoring CheckpointIO

log = logging.getLogger("distill")

LAST = "last.ckpt"
PARTIAL = ".partial"  # a checkpoint being written; never read
OLD = ".old"          # the previous directory checkpoint during a swap


# ----- files and directories ------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class _RecordingFile:
    """A file that remembers why a write failed: torch.save reports a failed write (e.g. a full
    disk) only as a position mismatch."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` into a partial file beside it, then rename it into place.

    Raises CheckpointError (one line) when the file cannot be written, e.g. the disk is full; the
    partial file is removed and whatever was at `path` before is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}{PARTIAL}-{os.getpid()}")
    for stale in path.parent.glob(f"{path.name}{PARTIAL}-*"):  # left by a killed writer
        if stale != partial:
            remove_path(stale)
    file = None
    try:
        with open(partial, "wb") as raw:
            file = _RecordingFile(raw)
            write(file)
            raw.flush()
            os.fsync(raw.fileno())
        replace_atomically(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):  # torch.save raises RuntimeError for a failed write
            cause = (file.error if file is not None else None) or error
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"could not write checkpoint {path} ({reason}; {free / 2**20:.1f} MiB free there); "
                f"the previous {path.name} is left as it was") from error
        raise


def replace_atomically(new: Path, path: Path) -> None:
    """Put `new` (a file or a directory, on the same filesystem) at `path`: at every moment `path`
    or `path`.old holds a whole checkpoint."""
    if new.is_dir() or path.is_dir():
        old = path.with_name(path.name + OLD)
        if path.exists():  # else `old` may be the only whole checkpoint (a resume from it): keep it until new is in
            remove_path(old)
            os.rename(path, old)
        os.rename(new, path)
        remove_path(old)
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


def link_atomically(source: Path, path: Path) -> None:
    """Make `path` the same file as `source` (a hard link; a copy where links are not allowed)."""
    partial = path.with_name(f"{path.name}{PARTIAL}-{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    replace_atomically(partial, path)


def find_last(directory: Path) -> Path | None:
    """The run's resumable checkpoint: last.ckpt, or last.ckpt.old when a directory swap was cut
    between its two renames; None when there is neither."""
    for candidate in (directory / LAST, directory / (LAST + OLD)):
        if candidate.exists():
            return candidate
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint writer, made atomic (and streaming: Lightning's own first
    serializes the whole checkpoint into memory)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options (got {storage_options!r})")
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file))


# ----- through the trainer --------------------------------------------------------------------

def wait_for_writes(trainer) -> None:
    """Block until an asynchronous checkpoint write is on disk (re-raising its error, if any)."""
    io = trainer.strategy.checkpoint_io
    if isinstance(io, AsyncCheckpointIO):
        io.teardown()


def require_finite(trainer) -> None:
    """Refuse to replace a good checkpoint: every loss so far (DistillModule.check_finite, the more
    telling message) and every weight must be finite."""
    module = trainer.lightning_module
    module.check_finite()
    params = [p.detach() for p in module.parameters() if p.numel()]
    # the max-abs norm: NaN or inf exactly when an element is, and no overflow of huge finite weights
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params, ord=float("inf")))).all():
        stage = module.stage
        raise NonFiniteLossError(
            f"stage {stage.name!r}: the student's weights hold NaN/inf after step {trainer.global_step}; "
            f"the checkpoints already written are intact. Lower stages[{module.stage_index}].lr (now {stage.lr})")


@contextlib.contextmanager
def written_by_all_ranks(path: Path, strategy) -> Iterator[Path]:
    """A fresh partial directory for a collective (DeepSpeed) save meant for `path`: every rank
    enters, saves its shard into the yielded path, and leaves once all shards are written."""
    partial = path.with_name(path.name + PARTIAL)
    if strategy.is_global_zero:
        remove_path(partial)
    strategy.barrier("checkpoint: partial directory ready")
    yield partial
    strategy.barrier("checkpoint: every shard written")


def write_weights_record(checkpoint: dict[str, Any], path: Path) -> None:
    """A checkpoint (read_checkpoint's dict) without its optimizer, schedule and callback states."""
    record = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers", "callbacks")}
    write_atomically(path, lambda file: torch.save(record, file))


def save_stage_end(trainer, path: Path) -> None:
    """The record of a finished stage: weights (fp32) and the `distill` record, no optimizer state;
    last.ckpt then points to it (every rank calls this). Under DeepSpeed the fp32 weights live in
    the ranks' optimizer shards: the full state is written once to a partial directory, rank 0
    consolidates the record from it, and the directory is removed."""
    require_finite(trainer)
    if uses_deepspeed(trainer):
        with written_by_all_ranks(path, trainer.strategy) as partial:
            trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            write_weights_record(read_checkpoint(partial), path)
            remove_path(partial)
    else:
        trainer.save_checkpoint(path, weights_only=True)
        wait_for_writes(trainer)
    if trainer.is_global_zero:
        link_atomically(path, path.parent / LAST)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments) for last.ckpt, which it writes atomically:
    through the trainer's CheckpointIO for files (conf/trainer/: AtomicCheckpointIO, wrapped in
    AsyncCheckpointIO on GPU presets), by a collective partial directory and a swap for DeepSpeed;
    and never over a good checkpoint with NaN/inf weights."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        require_finite(trainer)
        if not uses_deepspeed(trainer):
            super()._save_checkpoint(trainer, filepath)
            return
        with written_by_all_ranks(Path(filepath), trainer.strategy) as partial:
            super()._save_checkpoint(trainer, str(partial))
        if trainer.is_global_zero:
            replace_atomically(partial, Path(filepath))
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer, pl_module) -> None:
        """Nothing: Lightning would write a full last.ckpt here when the fit saved none; the stage-end
        record (save_stage_end) takes that place, without the optimizer state."""

    def save_now(self, trainer) -> None:
        """Write last.ckpt now, unless this step's is written already, and wait until it is on disk
        (every rank calls this: on a preemption signal)."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        wait_for_writes(trainer)
