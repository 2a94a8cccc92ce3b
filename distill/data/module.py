"""The DataModule: packed windows of the cached token stream, served in a resumable order.

Sample i of a stream is tokens[i*S : i*S + S + 1] (S = seq_len): windows do not overlap in the
S input positions, and each one's last token is the next one's first input. A batch is
{"input_ids": [B, S], "labels": [B, S]} with labels the next tokens.

The train order is an endless stream of seeded permutations (epoch e uses seed + e), dealt
round-robin to ranks; a run resumed at trainer.global_step restarts that stream exactly where
the interrupted run stood, so it sees the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.data.sources import Source
from distill.data.tokens import TokenStream, cached_stream, token_cache_dir


class PackedWindows(Dataset):
    """Windows of seq_len + 1 tokens of the first `max_tokens` tokens of a stream (all when None)."""

    def __init__(self, stream: TokenStream, seq_len: int, max_tokens: int | None = None) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.num_tokens = stream.num_tokens if max_tokens is None else min(max_tokens, stream.num_tokens)
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:  # opened per process: a memmap must not be pickled to workers
            self._tokens = self.stream.array()
        window = torch.from_numpy(self._tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}  # [S], [S]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def epoch_permutation(num_samples: int, seed: int) -> torch.Tensor:
    """[num_samples] the sample order of one epoch"""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))


class ResumableSampler(Sampler[int]):
    """Endless sample indices: global position j is sample epoch_permutation(n, seed + j // n)[j % n];
    rank r of W takes positions start + r, start + r + W, ... (start: a global position)."""

    def __init__(self, num_samples: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: there is no sample to draw")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start={start} must be >= 0")
        self.num_samples, self.seed, self.start = num_samples, seed, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        while True:
            epoch, offset = divmod(position, self.num_samples)
            mine = epoch_permutation(self.num_samples, self.seed + epoch)[offset :: self.world_size]
            yield from mine.tolist()
            position += len(mine) * self.world_size


class DistillDataModule(LightningDataModule):
    """Tokenized, packed, cached data of one run.

    `source` gives the train documents, and its "heldout" split the evaluation documents unless
    `heldout_source` is given (then all of that source is held out). tokenizer, teacher, seq_len,
    batch_size and seed come from the training job; the rest from conf/data/*.yaml.
    The trainer must be built with use_distributed_sampler=False: the sampler shards by rank itself.
    """

    def __init__(
        self,
        source: Source,
        *,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        cache_dir: str | Path,
        teacher: Any = None,
        seed: int = 0,
        heldout_source: Source | None = None,
        num_workers: int = 0,
        eval_tokens: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if eval_tokens is not None and eval_tokens < seq_len + 1:
            raise ValueError(f"eval_tokens={eval_tokens} holds no window of seq_len + 1 = {seq_len + 1} tokens")
        bound = {"teacher": teacher, "tokenizer": tokenizer, "cache_dir": cache_dir}
        self.source = source.bind(**bound)
        self.heldout_source = None if heldout_source is None else heldout_source.bind(**bound)
        self.tokenizer, self.cache_dir, self.teacher = tokenizer, Path(cache_dir), teacher
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_workers, self.eval_tokens = num_workers, eval_tokens
        self._streams: dict[str, TokenStream] = {}

    def _split_source(self, name: str) -> tuple[Source, str]:
        if name == "heldout" and self.heldout_source is not None:
            return self.heldout_source, "all"
        return self.source, name

    def stream(self, name: str) -> TokenStream:
        """The packed "train" or "heldout" stream, tokenized on first use and cached on disk."""
        if name not in self._streams:
            source, split = self._split_source(name)
            directory = token_cache_dir(self.cache_dir, source, self.tokenizer)
            self._streams[name] = self._check_vocabulary(cached_stream(directory, split, source, self.tokenizer))
        return self._streams[name]

    def _check_vocabulary(self, stream: TokenStream) -> TokenStream:
        """Every id must index the models' vocabulary: checked once per stream on the host, so that the
        training step needs no check (the fused KL would otherwise read labels back every step)."""
        vocab = getattr(getattr(self.teacher, "config", None), "vocab_size", None)
        if vocab is not None and stream.num_tokens:
            top = int(stream.array().max())
            if top >= vocab:
                raise ValueError(f"token cache {stream.path} holds id {top}, but the teacher's vocabulary has "
                                 f"{vocab} entries: the tokenizer ({type(self.tokenizer).__name__}, "
                                 f"{len(self.tokenizer)} entries) does not belong to this teacher; pass its own "
                                 "tokenizer (teacher.tokenizer=...)")
        return stream

    def prepare_data(self) -> None:
        self.stream("train")
        self.stream("heldout")

    def setup(self, stage: str | None = None) -> None:
        self.train_dataset = PackedWindows(self.stream("train"), self.seq_len)
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"the train split has {self.train_dataset.num_tokens} tokens, fewer than seq_len + 1 = "
                f"{self.seq_len + 1}; use more data or a shorter seq_len"
            )

    def resume_position(self) -> int:
        """Global samples already consumed: global_step x accumulate_grad_batches x batch_size x world_size."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches * self.batch_size * trainer.world_size

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(len(self.train_dataset), self.seed, self.resume_position(), rank, world_size)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def heldout_batches(self, batch_size: int | None = None, seq_len: int | None = None,
                        max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Windows of seq_len (default: the train seq_len) of the first max_tokens (default:
        eval_tokens) held-out tokens in order, batched by batch_size (default: the train batch
        size; the last batch may be smaller)."""
        seq_len = seq_len or self.seq_len
        dataset = PackedWindows(self.stream("heldout"), seq_len, max_tokens or self.eval_tokens)
        if len(dataset) == 0:
            raise ValueError(
                f"the held-out data has {dataset.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                f"use a larger held-out split or a shorter seq_len"
            )
        return list(DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False))

    def summary(self) -> dict[str, Any]:
        """Token counts of both streams and where they are cached."""
        train, heldout = self.stream("train"), self.stream("heldout")
        return {
            "train_tokens": train.num_tokens,
            "heldout_tokens": heldout.num_tokens,
            "train_cache": str(train.path),
            "heldout_cache": str(heldout.path),
        }
