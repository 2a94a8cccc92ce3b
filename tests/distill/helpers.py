"""Job-level test helpers: a tiny HF Llama teacher with its own BPE, composed configs, and
distill-train-style checkpoints of students written without training."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from distill.cli import register_resolvers
from models.student import StudentConfig, build_student
from models.teacher import load_teacher

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("DISTILL_ASSETS", REPO.parent / "shared" / "assets"))
SHAKESPEARE = ASSETS / "text" / "tinyshakespeare.txt"


def make_tiny_teacher(out: Path, text: str, seed: int = 0, model_type: str = "llama") -> Path:
    """A random 2-layer GQA Llama (or another family: qwen2 has q/k/v biases) and a 384-token
    byte-level BPE trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def compose_train(overrides: list[str], run_dir: Path, cache_dir: Path, name: str = "train") -> DictConfig:
    """The real `name` config (train or eval), as the console script would see it, writing under run_dir."""
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def compose_tiny_job(teacher: Path, run_dir: Path, cache_dir: Path, extra: list[str] = (),
                     steps: int = 8) -> DictConfig:
    """A two-stage job on the tiny teacher and 1 MB of Shakespeare (paragraphs as documents)."""
    cfg = compose_train(tiny_job_overrides(teacher, steps) + list(extra), run_dir, cache_dir)
    cfg.data.source.document_separator = "\n\n"
    return cfg


def tiny_job_overrides(teacher: Path, steps: int) -> list[str]:
    return [
        f"teacher.path={teacher}",
        "data=text",
        f"data.source.paths=[{SHAKESPEARE}]",
        "data.eval_tokens=2048",
        f"max_steps_per_stage={steps}",
        "stages.0.seq_len=64", "stages.0.batch_size=4", "stages.0.lr=3e-3",
        "stages.1.seq_len=64", "stages.1.batch_size=4", "stages.1.lr=1e-3",
        "evaluation.seq_len=64", "evaluation.batch_size=4", "evaluation.max_new_tokens=8",
        "evaluation.prompt=ROMEO:",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "callbacks.model_checkpoint.every_n_train_steps=4", "trainer.log_every_n_steps=2",
    ]


def job_overrides(teacher: Path, text: Path, cache: Path, steps: int = 8, every: int = 3) -> list[str]:
    """A two-stage tiny job on one text file as the command line takes it (held-out text = the
    training text), `steps` per stage, last.ckpt every `every` steps."""
    return [
        f"teacher.path={teacher}", "data=text", f"data.source.paths=[{text}]",
        "data.source.document_separator=null", "data.source.heldout_percent=0",
        "+data.heldout_source._target_=distill.data.LocalFilesSource", f"+data.heldout_source.paths=[{text}]",
        "data.eval_tokens=1024", f"paths.cache_dir={cache}", f"max_steps_per_stage={steps}",
        "stages.0.seq_len=32", "stages.0.batch_size=4", "stages.0.lr=3e-3",
        "stages.1.seq_len=32", "stages.1.batch_size=4", "stages.1.lr=1e-3",
        "evaluation.seq_len=32", "evaluation.batch_size=4", "evaluation.max_new_tokens=4",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
    ]


def run_job(run_dir: Path, overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m distill.train` writing into run_dir, in `env` (default: this process's environment)
    with one intra-op thread, as the tests' own."""
    return subprocess.run([sys.executable, "-m", "distill.train", f"hydra.run.dir={run_dir}", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"})


def write_checkpoint(teacher_path: Path, cfg: StudentConfig, out: Path, seed: int = 0, tokenizer: Path | None = None):
    """A distill-train-style checkpoint of a student whose new parameters are moved off their init
    (so every term shows in the outputs); returns (path, the fp32 student)."""
    tokenizer = None if tokenizer is None else str(tokenizer)
    teacher, _ = load_teacher(str(teacher_path), tokenizer=tokenizer)
    student = build_student(teacher, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
    record = {"teacher": {"_target_": "models.teacher.load_teacher", "path": str(teacher_path),
                          "tokenizer": tokenizer},
              "student": dataclasses.asdict(cfg), "data": {}}
    torch.save({"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
                "distill": {"config": record, "stage_index": 1}}, out)
    return out, student.eval()


def export_cfg(tmp_path: Path, *overrides: str):
    return compose_train(list(overrides), tmp_path / "run", tmp_path / "cache", name="export")


def staged_module(student_cfg: StudentConfig, stage, total_steps: int):
    """(DistillModule, student) on the random tiny teacher of tests/models/test_student.py, set to `stage`."""
    from distill.module import DistillModule
    from distill.stages import check_fits
    from models.teacher import FrozenTeacher
    from tests.models.test_student import make_teacher

    teacher = make_teacher(dtype=torch.float32)
    student = build_student(teacher, student_cfg)
    module = DistillModule(FrozenTeacher(teacher), student, torch.optim.AdamW)
    check_fits(stage, student)
    module.set_stage(0, stage, total_steps=total_steps)
    return module, student
