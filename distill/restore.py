"""Teacher and student rebuilt from what a run left behind: a distill-train checkpoint (file or
ZeRO directory) or a distill-export format=hf folder. distill-eval and distill-export read through here.

Both record how the teacher was loaded (the checkpoint's `distill.config.teacher`, the folder's
config.json `distill.teacher`); non-null values in `teacher_overrides` (teacher.path=... on the
command line) replace the recorded ones, e.g. when the teacher has moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.checkpoints import read_checkpoint
from distill.lora import load_student
from models.student import StudentConfig, build_student


def with_overrides(recorded: dict, overrides: DictConfig | dict | None) -> DictConfig:
    """recorded, with the non-null values of overrides put over it."""
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides)
    return OmegaConf.merge(recorded, {k: v for k, v in (overrides or {}).items() if v is not None})


def is_export(path: str | Path) -> bool:
    """True for a distill-export format=hf folder (config.json of model_type rwkv_distill)."""
    config = Path(path) / "config.json"
    return config.is_file() and '"rwkv_distill"' in config.read_text()


def load_teacher(recorded: dict, overrides: DictConfig | dict | None, dtype: str):
    """(HF teacher model, tokenizer) from a recorded `teacher` config (a models.teacher.load_teacher call)."""
    return instantiate(with_overrides(recorded, overrides), dtype=dtype)


def from_checkpoint(path: str | Path, teacher_overrides=None, student_overrides=None,
                    teacher_dtype: str = "float32") -> tuple[nn.Module, Any, nn.Module, dict]:
    """(teacher model, tokenizer, student in eval mode with the checkpoint's fp32 weights, the run's
    recorded config {"teacher", "student", "data", ...}). A checkpoint taken during a LoRA stage
    gives the student with its adapters merged in."""
    checkpoint = read_checkpoint(path)
    run = checkpoint["distill"]["config"]
    teacher, tokenizer = load_teacher(run["teacher"], teacher_overrides, teacher_dtype)
    student_cfg = with_overrides(run["student"], student_overrides)
    student = build_student(teacher, StudentConfig(**OmegaConf.to_container(student_cfg)))
    load_student(student, checkpoint)
    return teacher, tokenizer, student.eval(), run


def from_export(folder: str | Path, teacher_overrides=None, teacher_dtype: str = "float32"
                ) -> tuple[nn.Module, Any, nn.Module, dict]:
    """(teacher model, the folder's tokenizer, its StudentLM loaded by transformers from the folder's
    own code, the recorded provenance). The student is the exported copy of models.student.StudentLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto")
    provenance = model.config.distill
    teacher, _ = load_teacher(provenance["teacher"], teacher_overrides, teacher_dtype)
    return teacher, AutoTokenizer.from_pretrained(folder, trust_remote_code=True), model.student.eval(), provenance
