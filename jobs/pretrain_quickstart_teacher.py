"""Pretrain the quickstart teacher: a tiny Llama (GQA, tied embeddings) with its own byte-level BPE.

Trained on CPU from the Python standard-library source of the running interpreter
(distill.data.stdlib), so anyone can rebuild it without a download:

    python jobs/pretrain_quickstart_teacher.py --steps 600 --warmup 50   # the committed teacher

Writes a Hugging Face folder (config, safetensors, tokenizer, generation config) plus
metrics.json and a model card README.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.data.stdlib import stdlib_documents  # noqa: E402

EOT = "<|endoftext|>"  # id 0: BOS, EOS and pad at once
SLICE_TOKENS = 8192  # predicted tokens of the held-out slice the test re-measures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/quickstart_teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the train split; no post-processor, the packer adds [bos] itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_documents("train"), trainer=trainer)
    assert tok.token_to_id(EOT) == 0
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        clean_up_tokenization_spaces=False,  # keeps decode(encode(src)) == src
        model_max_length=512,
    )


def packed_stream(tokenizer: PreTrainedTokenizerFast, split: str) -> torch.Tensor:
    """[bos] + ids of every document of the split, concatenated in file order: [N]."""
    docs = list(stdlib_documents(split))
    encoded = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping windows of `size` tokens (the tail shorter than size is dropped): [W, size]."""
    n = stream.numel() // size
    return stream[: n * size].view(n, size)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, naming the class transformers 4.x also knows (5.x writes its own alias)."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine from lr down to min_lr_ratio * lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: LlamaForCausalLM, args: argparse.Namespace) -> torch.optim.AdamW:
    # decay only matrices; norms' gains stay free
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def batch_order(num_windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices for every step, a fresh seeded permutation per epoch: [steps, batch_size]."""
    gen = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    perms = [torch.randperm(num_windows, generator=gen) for _ in range(math.ceil(needed / num_windows))]
    return torch.cat(perms)[:needed].view(steps, batch_size)


def lm_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a [B, T+1] batch (every position after the first is predicted)."""
    logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def train(model: LlamaForCausalLM, data: torch.Tensor, args: argparse.Namespace) -> dict:
    """Plain AdamW loop over shuffled windows; returns tokens trained, wall time and the last losses."""
    opt = make_optimizer(model, args)
    order = batch_order(data.shape[0], args.steps, args.batch_size, args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    start = tick = time.perf_counter()
    recent: list[float] = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = lm_loss(model, data[order[step]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every :]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.perf_counter()
            tok_s = len(recent) * tokens_per_step / (now - tick)
            print(f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                  f"lr {lr_at(step, args):.2e} tok/s {tok_s:.0f}", flush=True)
            tick = now
    wall = time.perf_counter() - start
    return {"tokens_trained": args.steps * tokens_per_step, "train_wall_seconds": round(wall, 1),
            "train_tokens_per_second": round(args.steps * tokens_per_step / wall, 1),
            "final_train_loss": round(sum(recent) / len(recent), 4)}


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of non-overlapping seq_len+1 windows; (ppl, tokens)."""
    model.eval()
    data = windows(stream, seq_len + 1)
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        batch = data[i : i + batch_size]
        n = batch[:, 1:].numel()
        total += lm_loss(model, batch).item() * n
        count += n
    return math.exp(total / count), count


def write_card(out: Path, metrics: dict, command: str) -> None:
    m = metrics
    card = f"""# quickstart_teacher

A tiny Llama-architecture causal LM with its own byte-level BPE tokenizer, pretrained from
scratch on the Python standard-library source of the interpreter that trained it
(`distill.data.stdlib`, train split). It is the default teacher of the distillation quickstart:
small enough that distilling it into an RWKV student of the same width and depth, plus
evaluation, fits in minutes on a 2-core CPU. It writes Python-looking code, nothing more.

## Architecture

| | |
| --- | --- |
| parameters | {m['params']:,} (tied input/output embeddings) |
| layers / hidden / intermediate | {m['config']['num_hidden_layers']} / {m['config']['hidden_size']} / {m['config']['intermediate_size']} |
| attention heads / KV heads / head dim | {m['config']['num_attention_heads']} / {m['config']['num_key_value_heads']} / {m['config']['head_dim']} (grouped-query) |
| vocabulary | {m['config']['vocab_size']} (byte-level BPE; `<|endoftext|>` = id 0 is BOS, EOS and pad) |
| context | {m['config']['max_position_embeddings']} positions, RoPE θ = {m['config']['rope_theta']:g} |

The tokenizer adds no special tokens on its own: documents are packed as `[bos] + ids`.
`decode(encode(text)) == text` for Python source.

## Training

{m['steps']} AdamW steps of {m['batch_size']} × {m['seq_len']} tokens (lr {m['lr']:g}, warmup {m['warmup']},
cosine to {m['min_lr_ratio']:g}·lr, weight decay {m['weight_decay']:g}, grad clip 1.0), seed {m['seed']},
on shuffled non-overlapping windows of the packed train stream ({m['train_stream_tokens']:,} tokens):
{m['tokens_trained']:,} tokens trained in {m['train_wall_seconds']:.0f} s on {m['threads']} CPU threads
({m['train_tokens_per_second']:.0f} tokens/s; the cores were shared with other work), final train loss {m['final_train_loss']}.

## Held-out results

Perplexity on the held-out split of the stdlib (files chosen by path hash), packed the same way,
non-overlapping windows of {m['seq_len'] + 1} tokens, every predicted token counted:

| split | predicted tokens | perplexity |
| --- | --- | --- |
| heldout | {m['heldout_tokens']:,} | {m['heldout_ppl']:.3f} |
| heldout, first {m['heldout_slice_tokens']:,} predicted tokens | {m['heldout_slice_tokens']:,} | {m['heldout_slice_ppl']:.3f} |

Python {m['python_version']}, torch {m['torch_version']}, transformers {m['transformers_version']}, {m['date']}.
The corpus is the stdlib of the running Python, so other Python versions give a slightly different
corpus and slightly different numbers.

## Reproduce

    {command}
"""
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(args.vocab_size)
    train_stream = packed_stream(tokenizer, "train")
    heldout_stream = packed_stream(tokenizer, "heldout")
    print(f"tokenizer + packing {time.perf_counter() - t0:.1f}s: train {train_stream.numel()} tokens, "
          f"heldout {heldout_stream.numel()} tokens", flush=True)

    model = build_model(len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params}", flush=True)
    stats = train(model, windows(train_stream, args.seq_len + 1), args)

    heldout_ppl, heldout_tokens = perplexity(model, heldout_stream, args.seq_len)
    slice_ppl, slice_tokens = perplexity(model, heldout_stream[: SLICE_TOKENS // args.seq_len * (args.seq_len + 1)],
                                         args.seq_len)
    print(f"heldout ppl {heldout_ppl:.3f} over {heldout_tokens} tokens; "
          f"first {slice_tokens} tokens ppl {slice_ppl:.3f}", flush=True)

    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    cfg = model.config
    metrics = {
        "params": params,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "max_position_embeddings")} | {"rope_theta": cfg.rope_parameters["rope_theta"]},
        **{k: getattr(args, k) for k in ("seed", "steps", "seq_len", "batch_size", "lr", "min_lr_ratio",
                                         "warmup", "weight_decay", "threads")},
        "train_stream_tokens": train_stream.numel(),
        **stats,
        "heldout_ppl": round(heldout_ppl, 4),
        "heldout_tokens": heldout_tokens,
        "heldout_slice_ppl": round(slice_ppl, 4),
        "heldout_slice_tokens": slice_tokens,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    command = "python jobs/pretrain_quickstart_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_card(out, metrics, command.strip())
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
