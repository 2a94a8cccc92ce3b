"""What a run records besides checkpoints: the loggers (conf/logger/: csv, wandb, or both), and
what they are given beyond the per-step metrics the module logs.

- Every logger gets the resolved config. Per step: each stage's losses, `<stage>/lr`, tok/s (and
  whatever else the module logs); the `stage` index when a stage starts and ends.
- Loggers that hold tables and images (W&B): the per-layer alignment errors over the align stage
  (a table and a layers × steps heatmap), the final evaluation, the greedy generations and the
  stages (tables).
- W&B runs offline when no API key is set (WANDB_API_KEY unset, no ~/.netrc entry): nothing goes
  over the network; `wandb sync <run dir>/wandb/offline-run-*` uploads later. The run id is kept
  in <run dir>/wandb_run_id, so a resumed or requeued job continues the same W&B run.
- The CSV logger appends to an existing logs/metrics.csv (a resumed run) instead of deleting it.
"""

from __future__ import annotations

import csv
import functools
import netrc
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

RUN_ID_FILE = "wandb_run_id"


def make_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers named in cfg.logger (name → config; logger=null: none), each given the resolved config."""
    loggers = [instantiate(spec) for spec in (cfg.get("logger") or {}).values() if spec]
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


# ----- CSV ------------------------------------------------------------------------------------

class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes an existing metrics.csv here; keep it and its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, appending to the metrics.csv of an earlier run in the same directory."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# ----- Weights & Biases -----------------------------------------------------------------------

def has_wandb_key() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file for the W&B host (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run_id(save_dir: Path) -> str:
    """This run dir's W&B run id: read back when a resumed job starts again, else made and kept."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    new = secrets.token_hex(4)  # W&B's form: 8 lowercase letters or digits
    if rank_zero_only.rank == 0:  # the only rank with a W&B run
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new + "\n")
    return new


def wandb_logger(save_dir: str, project: str, id: str | None = None, offline: bool | None = None,
                 **kwargs: Any) -> WandbLogger:
    """Lightning's WandbLogger (same arguments) with the run dir's run id (unless `id` is given) and
    offline=None meaning: offline unless an API key is set (a WANDB_MODE in the environment wins)."""
    if offline is None:
        offline = "WANDB_MODE" not in os.environ and not has_wandb_key()
    return WandbLogger(save_dir=save_dir, project=project, id=id or run_id(Path(save_dir)), offline=offline,
                       **kwargs)


def finishes_wandb_runs(job: Callable[..., Any]) -> Callable[..., Any]:
    """Close the job's W&B run when `job` returns or raises (a later job in this process starts its own)."""

    @functools.wraps(job)
    def closing(*args, **kwargs):
        failed = True
        try:
            result = job(*args, **kwargs)
            failed = False
            return result
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and wandb.run is not None:
                wandb.finish(exit_code=int(failed))

    return closing


# ----- what the loggers are given -------------------------------------------------------------

def _tabular(loggers: list[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def heatmap(values: np.ndarray, cell: int = 12) -> np.ndarray:
    """[L, S] values → [L·cell, S·cell, 3] uint8 image, dark blue (smallest) to yellow (largest)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    span = values.max() - values.min()
    t = (values - values.min()) / (span if span > 0 else 1.0)
    position = np.linspace(0, 1, len(anchors))
    rgb = np.stack([np.interp(t, position, anchors[:, c]) for c in range(3)], axis=-1)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1).astype(np.uint8)


class RunReport(L.Callback):
    """Logs the learning rate, the stage boundaries, and the align stage's per-layer errors."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.errors: list[tuple[int, list[float]]] = []  # (step, per-layer alignment error)
        self._log_stage(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stage = pl_module.stage
        pl_module.log(f"{stage.name}/lr", trainer.optimizers[0].param_groups[0]["lr"])
        if stage.loss == "align" and trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = trainer.callback_metrics
            layers = sorted((k for k in metrics if k.startswith(f"{stage.name}/align_layer")),
                            key=lambda k: int(k.rsplit("layer", 1)[1]))
            self.errors.append((trainer.global_step, [float(metrics[k]) for k in layers]))

    def on_train_end(self, trainer, pl_module) -> None:
        self._log_stage(trainer, pl_module)
        loggers = _tabular(trainer.loggers)
        if not self.errors or not loggers:
            return
        stage = pl_module.stage.name
        rows = [[stage, step, layer, error] for step, errors in self.errors for layer, error in enumerate(errors)]
        grid = np.array([errors for _, errors in self.errors]).T  # [layers, logged steps]
        caption = (f"{stage}: alignment error per layer (rows, layer 0 on top) over steps {self.errors[0][0]}.."
                   f"{self.errors[-1][0]} (columns); from {grid.min():.4f} (dark) to {grid.max():.4f} (yellow)")
        for logger in loggers:
            logger.log_table(f"{stage}/alignment_errors", columns=["stage", "step", "layer", "error"], data=rows)
            logger.log_image(f"{stage}/alignment_heatmap", images=[heatmap(grid)], caption=[caption])

    @staticmethod
    def _log_stage(trainer, pl_module) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"stage": pl_module.stage_index}, step=trainer.global_step)


@rank_zero_only
def log_summary(loggers: list[Logger], summary: dict[str, Any]) -> None:
    """The end-of-run evaluation, generations, stages and final per-layer errors, as tables."""
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    stage_keys = ["name", "loss", "steps", "tokens", "final_loss", "seconds"]
    for logger in _tabular(loggers):
        logger.log_table("eval", columns=list(metrics), data=[list(metrics.values())])
        logger.log_table("stages", columns=stage_keys, data=[[s.get(k) for k in stage_keys] for s in summary["stages"]])
        logger.log_table("alignment_errors", columns=["layer", "error"],
                         data=[[i, e] for i, e in enumerate(summary.get("alignment_errors", []))])
        continuation = summary.get("continuation")
        if continuation:
            logger.log_table("generations", columns=["prompt", "teacher", "student"],
                             data=[[continuation["prompt"], continuation["teacher"], continuation["student"]]])
        logger.experiment.summary.update(metrics)
