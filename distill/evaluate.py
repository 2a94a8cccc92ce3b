"""`distill-eval`: the conversion report of a saved student against its teacher, on any text file.

    distill-eval ckpt=outputs/<run>/checkpoints/last.ckpt text=held_out.txt
    distill-eval ckpt=exports/my-rwkv text=held_out.txt                # a distill-export format=hf folder
    distill-eval ckpt=... text=... teacher.path=/elsewhere/teacher      # override where the teacher is

Teacher and student are rebuilt from what the checkpoint (or the folder's config.json) recorded;
non-null `teacher.*` / `student.*` values given here replace the recorded ones. Writes into this
run's directory: eval.json (the summary keys of a training run that do not depend on training,
per-layer alignment errors, the per-position NLL gap, long-context decode costs, samples),
long_context.json, three PNG plots and report.md; report.constant_memory=FILE (a JSON of
benchmarks/constant_memory.py) adds its plot and summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from distill.cli import CONF_DIR, register_resolvers, run_cli, summary_table
from distill.data.module import DistillDataModule
from distill.data.sources import LocalFilesSource
from distill.evaluation import compare_on_batches, continuations
from distill.parallel import resolve_precision, teacher_dtype
from distill.report import long_context, nll_gap_by_position, samples
from distill.report_render import markdown, write_plots
from distill.restore import from_checkpoint, from_export, is_export
from models.diagnostics import alignment_errors
from models.teacher import FrozenTeacher


def load_models(cfg: DictConfig, device: torch.device):
    """(FrozenTeacher, tokenizer, student) on device, from a checkpoint or an exported folder."""
    dtype = teacher_dtype(resolve_precision(cfg.precision))
    if is_export(cfg.ckpt):
        teacher, tokenizer, student, _ = from_export(cfg.ckpt, cfg.teacher, dtype)
    else:
        teacher, tokenizer, student, _ = from_checkpoint(cfg.ckpt, cfg.teacher, cfg.student, dtype)
    return FrozenTeacher(teacher).to(device), tokenizer, student.to(device).eval()


def default_prompts(batches: list[dict[str, torch.Tensor]], tokenizer, count: int, tokens: int) -> list[str]:
    """The openings of the first `count` held-out windows (their first `tokens` tokens, BOS left out)."""
    rows = torch.cat([b["input_ids"] for b in batches])[:count, :tokens + 1].tolist()
    return [tokenizer.decode([t for t in row if t != tokenizer.bos_token_id], skip_special_tokens=True)
            for row in rows]


def report(cfg: DictConfig, teacher, tokenizer, student, batches) -> dict[str, Any]:
    """The report's measurements (distill/report.py)."""
    r = cfg.report
    device = next(student.parameters()).device
    contexts = list(r.contexts.cuda if device.type == "cuda" else r.contexts.cpu)
    prompts = list(r.prompts) or default_prompts(batches, tokenizer, r.num_prompts, r.prompt_tokens)
    return {
        "alignment_errors": alignment_errors(teacher, student, batches[0]["input_ids"].to(device)),
        "nll_gap_by_position": nll_gap_by_position(teacher, student, batches),
        "long_context": long_context(teacher, student, student.shape.vocab_size, contexts, r.decode_steps, r.seed),
        "samples": samples(teacher, student, tokenizer, prompts, r.sample_tokens, r.temperature, r.seed),
    }


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the checkpoint or exported folder on the text file; write the report; return eval.json's dict."""
    if not Path(cfg.text).is_file():
        raise FileNotFoundError(f"text={cfg.text!r}: no such file")
    if cfg.report.constant_memory and not Path(cfg.report.constant_memory).is_file():
        raise FileNotFoundError(f"report.constant_memory={cfg.report.constant_memory!r}: no such file")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer, student = load_models(cfg, device)
    text = LocalFilesSource(paths=[cfg.text], document_separator=cfg.document_separator)
    data = DistillDataModule(text, heldout_source=text, tokenizer=tokenizer, seq_len=cfg.seq_len,
                             batch_size=cfg.batch_size, cache_dir=cfg.paths.cache_dir, eval_tokens=cfg.eval_tokens)
    batches = data.heldout_batches()
    result = {
        **compare_on_batches(teacher, student, batches, cfg.kl_chunk_tokens),
        "ckpt": str(cfg.ckpt), "text": str(cfg.text),
        "continuation": continuations(teacher, student, tokenizer, cfg.prompt, cfg.max_new_tokens),
        **report(cfg, teacher, tokenizer, student, batches),
    }
    if cfg.report.constant_memory:  # measured apart, in one process per model: read, not re-run
        result["constant_memory"] = json.loads(Path(cfg.report.constant_memory).read_text())
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    (out_dir / "long_context.json").write_text(json.dumps(result["long_context"], indent=2))
    write_plots(result, out_dir)
    (out_dir / "report.md").write_text(markdown(result))
    print(summary_table(result))
    print(f"report: {out_dir / 'report.md'}")
    return result


register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
