"""The committed quickstart teacher loads offline, has the promised shape, and still predicts held-out code."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from distill.data.stdlib import stdlib_documents  # noqa: E402

FOLDER = Path(__file__).resolve().parents[2] / "models" / "quickstart_teacher"
SEQ_LEN = 256
SLICE_WINDOWS = 32  # 32 windows of 257 tokens = the first 8192 predicted held-out tokens
# heldout_slice_ppl of metrics.json (measured by jobs/pretrain_quickstart_teacher.py) x 1.1
SLICE_PPL_BOUND = 1.1 * 41.5897


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOLDER, local_files_only=True).eval()


def test_config_is_small_gqa_llama_with_tied_embeddings(model) -> None:
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= params <= 5_000_000


def test_weights_file_is_at_most_10_mb() -> None:
    assert (FOLDER / "model.safetensors").stat().st_size <= 10 * 2**20


def test_special_token_is_bos_eos_pad_and_never_added(tokenizer, model) -> None:
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert model.config.bos_token_id == model.config.eos_token_id == 0
    assert len(tokenizer) == model.config.vocab_size
    assert 0 not in tokenizer("import os\n")["input_ids"]


def test_tokenizer_round_trips_python_source(tokenizer) -> None:
    texts = list(stdlib_documents("heldout"))[:5]
    texts.append("def f(x):\r\n\tif x  :   return 'héllo ✓ 漢字'  \n\n\n    # trailing   \n")
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text)  # BPE merges actually compress code


def heldout_slice(tokenizer) -> torch.Tensor:
    """The held-out stream packed as [bos] + ids per document, first SLICE_WINDOWS windows: [W, SEQ_LEN + 1]."""
    need = SLICE_WINDOWS * (SEQ_LEN + 1)
    ids: list[int] = []
    for doc in stdlib_documents("heldout"):
        ids += [tokenizer.bos_token_id] + tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) >= need:
            break
    return torch.tensor(ids[:need]).view(SLICE_WINDOWS, SEQ_LEN + 1)


@torch.no_grad()
def test_heldout_slice_perplexity_within_bound(tokenizer, model) -> None:
    windows = heldout_slice(tokenizer)
    logits = model(input_ids=windows[:, :-1]).logits  # [W, T, V]
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    ppl = math.exp(nll.item())
    # far below uniform over the vocabulary: the weights are trained, not random or shuffled
    assert ppl < SLICE_PPL_BOUND < model.config.vocab_size / 10
