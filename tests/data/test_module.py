import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from distill.data import DistillDataModule
from tests.data.conftest import ListSource

# 40 documents of 2..6 words over a..g: a few hundred tokens, about 5% held out by hash.
DOCS = [" ".join("abcdefg"[(i * 3 + j) % 7] for j in range(2 + i % 5)) for i in range(40)]


def make_module(tmp_path, tok, source=None, **kwargs) -> DistillDataModule:
    defaults = {"seq_len": 4, "batch_size": 3, "seed": 11, "cache_dir": tmp_path}
    return DistillDataModule(source or ListSource(DOCS, heldout_percent=10.0), tokenizer=tok, **{**defaults, **kwargs})


def test_batches_are_windows_of_the_train_stream_with_shifted_labels(tmp_path, tok):
    dm = make_module(tmp_path, tok)
    dm.prepare_data()
    dm.setup("fit")
    tokens = torch.from_numpy(dm.stream("train").array().astype("int64"))
    assert len(dm.train_dataset) == (len(tokens) - 1) // 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 4)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for inputs, labels in zip(batch["input_ids"], batch["labels"]):
        starts = [i * 4 for i in range(len(dm.train_dataset)) if torch.equal(tokens[i * 4 : i * 4 + 4], inputs)]
        assert any(torch.equal(tokens[s + 1 : s + 5], labels) for s in starts)


def test_prepare_then_setup_reads_each_split_once(tmp_path, tok):
    source = ListSource(DOCS, heldout_percent=10.0)
    dm = make_module(tmp_path, tok, source)
    dm.prepare_data()
    dm.setup("fit")
    dm.heldout_batches()
    assert source.reads == 2  # train once, heldout once
    again = make_module(tmp_path, tok, source)
    again.prepare_data()
    again.setup("fit")
    assert source.reads == 2  # a second run starts from the cache


def test_heldout_batches_cover_the_first_eval_tokens_in_order(tmp_path, tok):
    dm = make_module(tmp_path, tok, eval_tokens=14)
    held = torch.from_numpy(dm.stream("heldout").array().astype("int64"))
    assert len(held) >= 14
    batches = dm.heldout_batches(batch_size=2)
    inputs = torch.cat([b["input_ids"] for b in batches])  # (14 - 1) // 4 = 3 windows
    labels = torch.cat([b["labels"] for b in batches])
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    assert torch.equal(inputs.flatten(), held[:12]) and torch.equal(labels.flatten(), held[1:13])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, dm.heldout_batches(batch_size=2)))


def test_heldout_source_replaces_the_heldout_split(tmp_path, tok):
    dm = make_module(tmp_path, tok, heldout_source=ListSource(["g f e d c b a"], heldout_percent=0.0))
    (batch,) = dm.heldout_batches()
    assert batch["input_ids"].tolist() == [[1, 9, 8, 7]] and batch["labels"].tolist() == [[9, 8, 7, 6]]


def test_train_and_heldout_streams_are_disjoint_documents(tmp_path, tok):
    dm = make_module(tmp_path, tok)
    train_docs = set(" ".join(map(str, d)) for d in _split_docs(dm.stream("train").array().tolist()))
    held_docs = set(" ".join(map(str, d)) for d in _split_docs(dm.stream("heldout").array().tolist()))
    assert held_docs and train_docs and not train_docs & held_docs


def _split_docs(tokens: list[int]) -> list[list[int]]:
    docs: list[list[int]] = []
    for t in tokens:
        docs.append([]) if t == 1 else docs[-1].append(t)
    return docs


def test_too_short_heldout_data_is_refused(tmp_path, tok):
    dm = make_module(tmp_path, tok, heldout_source=ListSource(["a b"]))
    with pytest.raises(ValueError, match="held-out data has 3 tokens, fewer than seq_len \\+ 1 = 5"):
        dm.heldout_batches()


def test_summary_reports_token_counts_and_cache_paths(tmp_path, tok):
    dm = make_module(tmp_path, tok)
    summary = dm.summary()
    assert summary["train_tokens"] == dm.stream("train").num_tokens > summary["heldout_tokens"] > 0
    assert summary["train_cache"].startswith(str(tmp_path)) and summary["train_cache"].endswith("train.bin")


class Recorder(LightningModule):
    """Records every batch it trains on; lr 0 so the weights do not matter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.weight.sum() * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path, tok, max_steps: int, ckpt_path=None) -> tuple[Recorder, Trainer]:
    module = Recorder()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on CPU workers and mid-epoch resume
        trainer.fit(module, datamodule=make_module(tmp_path / "cache", tok), ckpt_path=ckpt_path)
    return module, trainer


def test_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, tok):
    whole, _ = fit(tmp_path, tok, max_steps=8)
    first, trainer = fit(tmp_path, tok, max_steps=3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    rest, trainer = fit(tmp_path, tok, max_steps=8, ckpt_path=tmp_path / "step3.ckpt")
    assert len(whole.seen) == 16 and len(first.seen) == 6 and len(rest.seen) == 10  # 2 batches per step
    assert trainer.global_step == 8
    # had the sampler started at 0 instead of the restored step x 2 x 3, rest would replay first
    assert all(torch.equal(a, b) for a, b in zip(whole.seen, first.seen + rest.seen))
    # 48 samples: the stream passes into its second epoch and still matches
    assert len(torch.cat(whole.seen)) > len(trainer.datamodule.train_dataset)


def test_train_sampler_starts_after_the_samples_all_ranks_consumed(tmp_path, tok):
    dm = make_module(tmp_path, tok)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_step=2, accumulate_grad_batches=2, world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert (sampler.start, sampler.rank, sampler.world_size, sampler.seed) == (2 * 2 * 3 * 2, 1, 2, 11)
    dm.trainer = None
    assert (dm.train_dataloader().sampler.start, dm.train_dataloader().sampler.world_size) == (0, 1)


def test_ids_outside_the_teachers_vocabulary_are_refused_once_per_stream(tmp_path, tok):
    """The training step takes labels as they come (no per-step check on the device): a tokenizer that
    does not belong to the teacher is caught here, naming the id and the vocabulary size."""
    from types import SimpleNamespace

    small = SimpleNamespace(config=SimpleNamespace(vocab_size=5))  # WORDS ids reach 9
    with pytest.raises(ValueError, match=r"holds id \d+, but the teacher's vocabulary has 5 entries"):
        make_module(tmp_path, tok, teacher=small).prepare_data()
    fits = SimpleNamespace(config=SimpleNamespace(vocab_size=len(tok)))
    make_module(tmp_path, tok, teacher=fits).prepare_data()
