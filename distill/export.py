"""`distill-export`: a trained student as a folder other runtimes load (DESIGN §8).

    distill-export ckpt=outputs/<run>/checkpoints/last.ckpt out=exports/my-rwkv           # HF folder
    distill-export ckpt=... out=exports/my-rwkv-native format=rwkv dtype=bf16              # RWKV-7 .pth
    distill-export ckpt=... out=exports/my-rwkv-fla format=fla                             # fla folder
    distill-export ckpt=... out=exports/my-rwkv-int8 quantize=int8                         # HF, int8 weights
    distill-export ckpt=... out=exports/my-rwkv-onnx format=onnx                           # ONNX step (+int8)

ckpt is a Lightning .ckpt file or a DeepSpeed ZeRO checkpoint directory (consolidated). The teacher
recorded in the checkpoint is loaded for its shape, rotary embedding, tokenizer and generation
settings (teacher.path=... when it has moved). Every format gets the tokenizer files; format=hf
also records where the teacher is, for distill-eval's report. format=onnx is the one-token recurrent
step (distill/export_onnx.py), fp32 plus an int8 variant: dtype must stay fp32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distill.cli import CONF_DIR, register_resolvers, run_cli
from distill.export_hf import hf_tokenizer, write_hf
from distill.export_native import write_fla, write_rwkv
from distill.export_onnx import write_onnx
from distill.quantize import check_quantize, write_quantized
from distill.restore import from_checkpoint, with_overrides

FORMATS = ("hf", "fla", "rwkv", "onnx")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_choices(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {FORMATS}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not one of {tuple(DTYPES)}")
    check_quantize(cfg.quantize, cfg.format, cfg.dtype)
    if cfg.format == "onnx" and cfg.dtype != "fp32":
        raise ValueError(f"format=onnx writes fp32 (model.onnx) and int8 (model.int8.onnx) graphs; dtype={cfg.dtype!r} "
                         "is not one of them: leave dtype=fp32")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not empty; pass overwrite=true to replace it "
                         "(it stays as it is until the new export is complete)")


def provenance(cfg: DictConfig, run: dict[str, Any]) -> dict[str, Any]:
    """Where the export came from: the checkpoint and the teacher as loaded (absolute local paths)."""
    teacher = OmegaConf.to_container(with_overrides(run["teacher"], cfg.teacher))
    for key in ("path", "tokenizer"):
        if teacher.get(key) and Path(teacher[key]).exists():
            teacher[key] = str(Path(teacher[key]).resolve())
    return {"ckpt": str(Path(cfg.ckpt).resolve()), "teacher": teacher, "student": run["student"],
            "data": run.get("data"), "format": cfg.format, "dtype": cfg.dtype, "quantize": cfg.quantize}


def write(cfg: DictConfig, out: Path) -> list[str]:
    """The export into out (an empty directory)."""
    teacher, tokenizer, student, run = from_checkpoint(cfg.ckpt, cfg.teacher)
    dtype = DTYPES[cfg.dtype]
    if cfg.format == "hf":
        if not cfg.quantize:
            return write_hf(student, teacher, tokenizer, out, dtype, provenance(cfg, run))
        with tempfile.TemporaryDirectory(dir=out.parent) as fp32:  # transformers quantizes the fp32 folder as it loads it
            write_hf(student, teacher, tokenizer, Path(fp32), dtype, provenance(cfg, run))
            return write_quantized(Path(fp32), out, cfg.quantize)
    tokenizer = hf_tokenizer(tokenizer)
    if cfg.format == "rwkv":
        write_rwkv(student, out, dtype)
    elif cfg.format == "onnx":
        write_onnx(student, out)
    else:
        write_fla(student, tokenizer, out, dtype, teacher.config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    return sorted(p.name for p in out.iterdir())


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the export of cfg.ckpt to cfg.out; returns {"out", "format", "dtype", "quantize", "files"}.
    It is written beside out first and moved in place when complete, so a failed export (or a
    refused one: out not empty without overwrite=true) leaves out as it was."""
    check_choices(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        files = write(cfg, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)
    quantized = f" quantize={cfg.quantize}" if cfg.quantize else ""
    print(f"exported {cfg.ckpt} as format={cfg.format} dtype={cfg.dtype}{quantized} to {out}: {', '.join(files)}")
    return {"out": str(out), "format": cfg.format, "dtype": cfg.dtype, "quantize": cfg.quantize, "files": files}


register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
