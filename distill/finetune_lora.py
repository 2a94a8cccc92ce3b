"""LoRA fine-tuning of an exported student (a distill-export format=hf folder) on a local text file,
with peft and the transformers Trainer:

    python -m distill.finetune_lora exports/my-rwkv --text my_corpus.txt --out exports/my-rwkv-lora

OUT/adapter/ holds the adapters (adapter_model.safetensors, adapter_config.json; peft's
PeftModel.from_pretrained(model, OUT/adapter) puts them on the exported model again), OUT/merged/
the adapters merged into the weights: a folder like the input one, loaded by
AutoModelForCausalLM.from_pretrained(OUT/merged, trust_remote_code=True). The text is tokenized
once and cut into windows of --seq-len tokens, shuffled by the Trainer.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.cli import run_cli
from distill.lora import ATTENTION_PROJECTIONS, LoraSpec, check_targets
from distill.restore import is_export

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def windows(tokenizer: Any, text: str, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """The text's tokens cut into [seq_len] windows, each its own labels (the model shifts them)."""
    ids = torch.tensor(tokenizer(text)["input_ids"])  # [N]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return [{"input_ids": w, "labels": w} for w in ids[: n * seq_len].view(n, seq_len)]


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Train the adapters, write OUT/adapter, OUT/merged and OUT/losses.json (the loss of every step);
    returns {"losses", "adapter", "merged"}."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = LoraSpec(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules)
    out = Path(args.out)
    if not is_export(args.model):
        raise ValueError(f"{args.model!r} is not a distill-export format=hf folder (its config.json of "
                         "model_type rwkv_distill): export the student first (README: Export)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} exists and is not empty: give a new folder")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=DTYPES[args.dtype])
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    data = windows(tokenizer, Path(args.text).read_text(), args.seq_len)
    check_targets(model, spec)
    model = get_peft_model(model, spec.peft_config(task_type="CAUSAL_LM"))
    losses = train_adapters(model, data, args, out / "trainer")
    # the adapters only: peft would also save a targeted lm_head's own weight, which stays frozen here
    model.save_pretrained(out / "adapter", save_embedding_layers=False)
    merged = model.merge_and_unload()
    merged.config.distill = {**merged.config.distill, "lora_finetune": {
        **spec.record(), "text": str(Path(args.text).resolve()), "steps": args.steps, "lr": args.lr}}
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    for code in Path(args.model).glob("*.py"):  # the folder's own model code (transformers copies only some)
        shutil.copy(code, out / "merged" / code.name)
    (out / "losses.json").write_text(json.dumps(losses))
    print(f"LoRA r={spec.r} on {list(spec.target_modules)}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"over {args.steps} steps; adapters in {out / 'adapter'}, merged model in {out / 'merged'}")
    return {"losses": losses, "adapter": str(out / "adapter"), "merged": str(out / "merged")}


def train_adapters(model, data: list[dict[str, torch.Tensor]], args: argparse.Namespace, scratch: Path) -> list[float]:
    """args.steps Trainer steps over the shuffled windows (no checkpoints; scratch is removed);
    returns the loss of every step."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    training = TrainingArguments(
        output_dir=str(scratch), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a distill-export format=hf folder")
    parser.add_argument("--text", required=True, help="a UTF-8 text file to fine-tune on")
    parser.add_argument("--out", required=True, help="folder for adapter/ and merged/")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", nargs="+", default=list(ATTENTION_PROJECTIONS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the base weights while training")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_cli(finetune, parse(argv))  # a bad value: exit status 2 and one line, as distill-train's


if __name__ == "__main__":
    main()
