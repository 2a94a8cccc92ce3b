"""`student.attention_layers=auto:K`: keep the teacher's softmax attention in the K layers that the
align stage converted worst.

The job builds an all-RWKV student and runs its stages up to the last align stage. Before the next
stage starts, each layer's alignment error is measured on held-out batches, the K largest are
chosen, and the student is rebuilt with those layers as kept attention (models/hybrid.py: fresh
copies of the teacher's attention, every other trained weight carried over). From then on the run
records the explicit list in its config (`student.attention_layers` of every later checkpoint), so
resume, distill-eval and export rebuild the same model; a resumed job reads the list back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distill import parallel
from distill.checkpoints import read_checkpoint
from distill.cli import log
from distill.lora import load_student
from distill.stages import stages_from_config
from models.diagnostics import alignment_errors
from models.hybrid import check_kept_count, with_kept_attention, worst_layers
from models.student import StudentLM, build_student
from models.teacher import FrozenTeacher

_AUTO = re.compile(r"auto:(\d+)")
# Held-out batches of the evaluation's shape that rank the layers (errors differ ~10x across depth).
MEASURE_BATCHES = 8


def auto_count(attention_layers: Any) -> int | None:
    """K of "auto:K"; None for an explicit list of layer indices; ValueError for any other string."""
    if not isinstance(attention_layers, str):
        return None
    match = _AUTO.fullmatch(attention_layers)
    if match is None:
        raise ValueError(f"student.attention_layers={attention_layers!r}: give a list of layer indices "
                         "(e.g. [3,7]) or auto:K (K an integer: keep the K worst-aligned layers)")
    return int(match.group(1))


def mean_alignment_errors(teacher: FrozenTeacher, student: StudentLM, batches: list[dict]) -> list[float]:
    """Per layer, the mean over every token of `batches` ({"input_ids": [B, T]}) of the align loss."""
    device = next(student.parameters()).device
    per_batch = [(alignment_errors(teacher, student, b["input_ids"].to(device)), b["input_ids"].numel())
                 for b in batches]
    tokens = sum(n for _, n in per_batch)
    return [sum(errors[i] * n for errors, n in per_batch) / tokens for i in range(student.shape.num_layers)]


@dataclass(frozen=True)
class AutoAttention:
    """A pending auto:K switch: after stage `after` (the last align stage), keep K layers."""

    count: int
    after: int

    def check(self, student: StudentLM) -> None:
        check_kept_count(self.count, student.shape.num_layers)

    def due(self, index: int) -> bool:
        """True before stage `index` runs when that is the first stage after the align stage."""
        return index == self.after + 1

    def switch(self, cfg: DictConfig, module, teacher: FrozenTeacher, data, choices: dict[str, Any],
               precision: str, trained: Path) -> StudentLM:
        """Choose the layers, give `module` the hybrid student and record the list; returns the student.
        trained: the align stage-end checkpoint (its fp32 weights, consolidated, are the ones a
        DeepSpeed run keeps); when this run dir has none (resumed from another's), module.student."""
        student = module.student
        if trained.exists():  # a fresh module: a ZeRO-3 student's own parameters are partitioned
            student = build_student(teacher.model, student.config)
            load_student(student, read_checkpoint(trained))
        device = next(student.parameters()).device
        batches = data.heldout_batches()[:MEASURE_BATCHES]
        with torch.compiler.set_stance("force_eager"), parallel.autocast(precision, device):
            errors = mean_alignment_errors(teacher, student, batches)
        layers = worst_layers(errors, self.count)
        module.student = parallel.prepare_student(with_kept_attention(student, teacher.model, layers), choices)
        cfg.student.attention_layers = layers
        module.run_config["student"]["attention_layers"] = layers
        log.info("student.attention_layers=auto:%d keeps the teacher's attention in layers %s (alignment "
                 "errors after stage %d: %s)", self.count, layers, self.after,
                 " ".join(f"{e:.3f}" for e in errors))
        return module.student


def plan(cfg: DictConfig, checkpoint: dict[str, Any]) -> AutoAttention | None:
    """For auto:K, set cfg.student.attention_layers to the list the student is built with now and
    return the pending switch; None when the list is explicit or the switch is already done.

    A fresh job, or one resumed from a checkpoint of the align stage or before, builds an all-RWKV
    student ([]) and switches later; one resumed after the switch builds the recorded list.
    `checkpoint`: the resumed checkpoint's keys ({} for a fresh job)."""
    count = auto_count(cfg.student.attention_layers)
    if count is None:
        return None
    stages = stages_from_config(OmegaConf.to_container(cfg.stages, resolve=True))
    aligns = [i for i, stage in enumerate(stages) if stage.loss == "align"]
    if not aligns or aligns[-1] == len(stages) - 1:
        raise ValueError(f"student.attention_layers=auto:{count} chooses layers after the last align stage and "
                         f"needs a stage after it; the stages are {[(s.name, s.loss) for s in stages]}")
    after = aligns[-1]
    switched = bool(checkpoint) and checkpoint["distill"]["stage_index"] > after
    layers = list(checkpoint["distill"]["config"]["student"]["attention_layers"]) if switched else []
    cfg.student.attention_layers = layers
    return None if switched else AutoAttention(count, after)
