"""Data-free distillation: documents sampled from the teacher itself, cached on disk.

Each document is sampled from the teacher's document-start token (BOS, or EOS when the
tokenizer has no BOS) and ends at EOS or at BOS (the model starting a new story), or after
`max_new_tokens`. The samples are written once as jsonl under
cache_dir/teacher_samples/<key>.jsonl, keyed by a fingerprint of the teacher and tokenizer and
by the sampling settings, so a second run loads them instead of sampling again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distill.data.sources import Source, check_percent, check_split, in_split
from distill.data.tokens import document_start_id, tokenizer_fingerprint, write_atomically

log = logging.getLogger(__name__)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the config and of sum / sum of squares of the first, middle and last weights:
    cheap for any model size, and different for two random inits of one config."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    params = list(model.named_parameters())
    stats = [
        (name, list(p.shape), str(p.dtype), f"{p.double().sum().item():.6e}", f"{p.double().square().sum().item():.6e}")
        for name, p in (params[0], params[len(params) // 2], params[-1])
    ]
    return _sha(json.dumps([config, stats], sort_keys=True, default=str))[:16]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the top k: [B, V] -> [B]."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """The ids before the first stop id."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


@torch.no_grad()
def sample_documents_ids(
    model: torch.nn.Module,
    start_id: int,
    stop_ids: set[int],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> list[list[int]]:
    """`batch_size` sequences sampled after `start_id` with the KV cache, each cut before its
    first stop id; the loop ends once every row has stopped."""
    device = next(model.parameters()).device
    tokens = torch.full((batch_size, 1), start_id, dtype=torch.long, device=device)  # [B, 1]
    stops = torch.tensor(sorted(stop_ids), device=device)
    stopped = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
    past, sampled = None, []
    for _ in range(max_new_tokens):
        out = model(input_ids=tokens, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens = sample_next(out.logits[:, -1], temperature, top_k, generator)[:, None]  # [B, 1]
        sampled.append(tokens)
        stopped |= torch.isin(tokens[:, 0], stops)
        if stopped.all():
            break
    rows = torch.cat(sampled, dim=1).tolist()  # [B, T]
    return [cut_at_stop(row, stop_ids) for row in rows]


class TeacherSamplesSource(Source):
    """`num_documents` samples from the teacher (empty samples dropped), split by document hash.

    Built with the sampling settings from the config; the DataModule then hands over the teacher
    (an HF causal LM), its tokenizer and the cache dir through `bind`. Sampling runs on the
    teacher's device, seeded by `seed` (one generator for the whole run).
    """

    def __init__(
        self,
        num_documents: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        heldout_percent: float = 1.0,
    ) -> None:
        for name, value in (("num_documents", num_documents), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 (sampling; there is no greedy mode)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None (no restriction)")
        check_percent("heldout_percent", heldout_percent)
        self.num_documents, self.max_new_tokens, self.batch_size = num_documents, max_new_tokens, batch_size
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.heldout_percent = heldout_percent
        self.teacher: Any = None
        self.tokenizer: Any = None
        self.cache_dir: Path | None = None

    def bind(self, *, teacher: Any, tokenizer: Any, cache_dir: str | Path) -> TeacherSamplesSource:
        max_positions = getattr(teacher.config, "max_position_embeddings", None)
        if max_positions is not None and self.max_new_tokens + 1 > max_positions:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} does not fit the teacher's context of {max_positions} "
                f"positions (start token included); use at most {max_positions - 1}"
            )
        self.teacher, self.tokenizer, self.cache_dir = teacher, tokenizer, Path(cache_dir)
        return self

    def _sampling_key(self) -> str:
        if self.teacher is None:
            raise ValueError(
                "TeacherSamplesSource has no teacher: build it through DistillDataModule, "
                "or call .bind(teacher=, tokenizer=, cache_dir=) first"
            )
        return (
            f"teacher={teacher_fingerprint(self.teacher)}, tokenizer={tokenizer_fingerprint(self.tokenizer)}, "
            f"num_documents={self.num_documents}, max_new_tokens={self.max_new_tokens}, "
            f"temperature={self.temperature}, top_k={self.top_k}, seed={self.seed}, batch_size={self.batch_size}"
        )

    def fingerprint(self) -> str:
        return f"teacher_samples({self._sampling_key()}, heldout_percent={self.heldout_percent})"

    @property
    def samples_path(self) -> Path:
        """cache_dir/teacher_samples/<sha of the sampling key>.jsonl"""
        return self.cache_dir / "teacher_samples" / f"{_sha(self._sampling_key())[:16]}.jsonl"

    def _sample(self) -> list[str]:
        start_id = document_start_id(self.tokenizer)
        stop_ids = {t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if t is not None}
        generator = torch.Generator(device=next(self.teacher.parameters()).device).manual_seed(self.seed)
        texts: list[str] = []
        for begin in range(0, self.num_documents, self.batch_size):
            rows = sample_documents_ids(
                self.teacher,
                start_id,
                stop_ids,
                batch_size=min(self.batch_size, self.num_documents - begin),
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                generator=generator,
            )
            texts += [self.tokenizer.decode(ids) for ids in rows if ids]
            log.info("teacher samples: %d / %d documents", begin + len(rows), self.num_documents)
        return texts

    def load_or_sample(self) -> list[str]:
        """The cached samples, sampling and writing them first (atomically) when absent."""
        path = self.samples_path
        if not path.exists():
            lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in self._sample())
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        return (doc for doc in self.load_or_sample() if in_split(doc, split, self.heldout_percent))
