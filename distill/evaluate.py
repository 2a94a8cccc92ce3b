"""`distill-eval`: compare a saved student with its teacher on any text file.

    distill-eval ckpt=outputs/<run>/checkpoints/last.ckpt text=held_out.txt
    distill-eval ckpt=... text=... teacher.path=/elsewhere/teacher   # override what the checkpoint recorded

Teacher and student are rebuilt from the configuration recorded in the checkpoint; non-null
`teacher.*` / `student.*` values given here replace the recorded ones. Writes eval.json (the
summary keys of a training run that do not depend on training) in this run's directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill.checkpoints import read_checkpoint
from distill.cli import CONF_DIR, register_resolvers, run_cli, summary_table
from distill.data.module import DistillDataModule
from distill.data.sources import LocalFilesSource
from distill.evaluation import compare_on_batches, continuations
from distill.parallel import resolve_precision, teacher_dtype
from models.student import StudentConfig, build_student
from models.teacher import FrozenTeacher


def _with_overrides(recorded: dict, overrides: DictConfig | None) -> DictConfig:
    given = {k: v for k, v in (OmegaConf.to_container(overrides) if overrides else {}).items() if v is not None}
    return OmegaConf.merge(recorded, given)


def load_student(checkpoint: dict[str, Any], cfg: DictConfig, device: torch.device):
    """(FrozenTeacher, tokenizer, student) rebuilt from a checkpoint, on `device`."""
    run = checkpoint["distill"]["config"]
    precision = resolve_precision(cfg.precision)
    teacher_model, tokenizer = instantiate(_with_overrides(run["teacher"], cfg.teacher),
                                           dtype=teacher_dtype(precision))
    student_cfg = _with_overrides(run["student"], cfg.student)
    student = build_student(teacher_model, StudentConfig(**OmegaConf.to_container(student_cfg)))
    prefix = "student."
    student.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return FrozenTeacher(teacher_model).to(device), tokenizer, student.to(device).eval()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the checkpoint on the text file; write eval.json; return the metrics."""
    if not Path(cfg.text).is_file():
        raise FileNotFoundError(f"text={cfg.text!r}: no such file")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer, student = load_student(read_checkpoint(cfg.ckpt), cfg, device)
    text = LocalFilesSource(paths=[cfg.text], document_separator=cfg.document_separator)
    data = DistillDataModule(text, heldout_source=text, tokenizer=tokenizer, seq_len=cfg.seq_len,
                             batch_size=cfg.batch_size, cache_dir=cfg.paths.cache_dir, eval_tokens=cfg.eval_tokens)
    result = {
        **compare_on_batches(teacher, student, data.heldout_batches(), cfg.kl_chunk_tokens),
        "ckpt": str(cfg.ckpt), "text": str(cfg.text),
        "continuation": continuations(teacher, student, tokenizer, cfg.prompt, cfg.max_new_tokens),
    }
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    print(summary_table(result))
    return result


register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
