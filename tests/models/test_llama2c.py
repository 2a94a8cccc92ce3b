"""llama2.c checkpoints and tokenizer: exact greedy decode and NLL of stories260K, run.c encoding,
legacy/v1/untied formats, and errors for missing or corrupt files."""

import dataclasses
import os
import struct
from pathlib import Path

import pytest
import torch

from models.llama2c import (
    V1_HEADER_BYTES,
    V1_MAGIC,
    Llama2cTokenizer,
    load_llama2c,
    read_header,
    read_weights,
    weight_layout,
)

ASSETS = Path(os.environ.get("DISTILL_ASSETS", Path(__file__).resolve().parents[2].parent / "shared" / "assets"))
STORIES = ASSETS / "teachers" / "stories260K"
CKPT, TOK = STORIES / "stories260K.bin", STORIES / "tok512.bin"
VALID_TEXT = ASSETS / "text" / "tinystories_valid_head45.txt"
needs_assets = pytest.mark.skipif(
    not CKPT.is_file(), reason=f"stories260K test asset not found under {STORIES} (set DISTILL_ASSETS)"
)


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's 2 cores are shared: more threads only add contention to tiny matmuls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(CKPT, TOK)


@needs_assets
def test_greedy_decode_reproduces_reference(stories):
    model, tok = stories
    # run.c with steps=256 yields a 256-token sequence (BOS + 255 generated), then prints "\n".
    ref = (STORIES / "greedy_ref_256_emptyprompt.txt").read_text()
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=255, do_sample=False)
    assert out.shape == (1, 256)
    assert tok.decode(out[0].tolist(), skip_special_tokens=True) + "\n" == ref


def stream_of_stories(tok: Llama2cTokenizer) -> torch.Tensor:
    """All stories of the validation head, each [BOS] + encode(story), concatenated: [N]."""
    stories = [s.strip() for s in VALID_TEXT.read_text().split("<|endoftext|>")]
    return torch.tensor([i for s in stories if s for i in tok.encode(s, add_special_tokens=True)])


@needs_assets
@torch.no_grad()
def test_mean_nll_on_tinystories(stories):
    model, tok = stories
    ids = stream_of_stories(tok)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, 512):  # windows of 512 inputs, each predicting its next token
        targets = ids[start + 1:start + 513]
        logits = model(ids[start:start + len(targets)][None]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum").item()
        count += len(targets)
    assert len(ids) == 14_586 and count == 14_585
    assert nll / count == pytest.approx(1.2495, abs=5e-4)


def naive_run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's encode loop verbatim: rescan all pairs, merge the best (strictly greater score wins,
    so the leftmost on ties), until no pair merges."""
    ids = []
    for char in " " + text:
        piece = char.encode()
        ids += [tok.pieces.index(piece)] if piece in tok.pieces else [b + 3 for b in piece]
    while True:
        best, best_at, best_id = -1e10, None, None
        for i in range(len(ids) - 1):
            merged = tok.pieces[ids[i]] + tok.pieces[ids[i + 1]]
            if merged in tok.pieces and tok.scores[tok.pieces.index(merged)] > best:
                best_id = tok.pieces.index(merged)
                best, best_at = tok.scores[best_id], i
        if best_at is None:
            return ids
        ids[best_at:best_at + 2] = [best_id]


ROUND_TRIP = ["Once upon a time, there was a little dog.", "  two  spaces\n\ttab", "naïve café — 日本語 🙂", "a"]


@needs_assets
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_matches_run_c_and_round_trips(text):
    tok = Llama2cTokenizer(TOK)
    ids = tok.encode(text)
    assert ids == naive_run_c_encode(tok, text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=True), skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == "<s>" + text


@needs_assets
def test_tokenizer_byte_fallback_and_specials():
    tok = Llama2cTokenizer(TOK)
    assert "🙂" not in tok.get_vocab()
    assert tok.encode("🙂")[-4:] == [b + 3 for b in "🙂".encode()]
    assert tok.encode("") == [] and tok.encode("", add_special_tokens=True) == [1]
    assert (tok.bos_token_id, tok.eos_token_id, len(tok), tok.name_or_path) == (1, 2, 512, str(TOK))
    assert tok.get_vocab()["<s>"] == 1 and tok.get_vocab()[" the"] == tok.encode("the")[0]


def write_tokenizer(path: Path, pieces: list[tuple[bytes, float]]) -> Path:
    """A llama2.c tokenizer file: <unk>, <s>, </s>, 256 byte tokens, then `pieces`."""
    specials = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    byte_tokens = [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    body = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in specials + byte_tokens + pieces)
    path.write_bytes(struct.pack("<i", 8) + body)
    return path


def test_merge_ties_go_to_the_leftmost_pair(tmp_path):
    pieces = [(b" ", 0.0), (b"a", 0.0), (b"b", 0.0), (b" a", -1.0), (b"ab", -1.0), (b"aa", -2.0), (b"bb", -5.0)]
    tok = Llama2cTokenizer(write_tokenizer(tmp_path / "tok.bin", pieces))
    ids = {piece: 259 + i for i, (piece, _) in enumerate(pieces)}
    assert tok.encode("ab") == [ids[b" a"], ids[b"b"]]  # " a" and "ab" tie: " a" is leftmost
    assert tok.encode("baab") == [ids[b" "], ids[b"b"], ids[b"a"], ids[b"ab"]]  # "ab" beats "aa"
    assert tok.encode("bbb") == [ids[b" "], ids[b"bb"], ids[b"b"]]
    for text in ["ab", "baab", "bbb", "abab aab", "aaaa"]:
        assert tok.encode(text) == naive_run_c_encode(tok, text)


def write_checkpoint(path: Path, header, weights: dict[str, torch.Tensor]) -> Path:
    """Write `weights` in the file layout of `header` (legacy when version 0, else v1)."""
    sizes = (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads)
    if header.version == 0:
        vocab = header.vocab_size if header.shared_classifier else -header.vocab_size
        head = struct.pack("<7i", *sizes, vocab, header.seq_len)
    else:
        head = struct.pack("<Ii7iB", V1_MAGIC, header.version, *sizes, header.vocab_size, header.seq_len,
                           header.shared_classifier)
        head = head.ljust(V1_HEADER_BYTES, b"\0")
    body = b"".join(weights[name].contiguous().numpy().tobytes() for name, _ in weight_layout(header))
    path.write_bytes(head + body)
    return path


def stories_weights():
    data = CKPT.read_bytes()
    header = read_header(data, CKPT)
    return header, read_weights(data, header, CKPT)


@needs_assets
@pytest.mark.parametrize("version,shared", [(1, True), (1, False), (0, False)])
def test_v1_and_untied_formats_load_the_same_model(tmp_path, stories, version, shared):
    model, _ = stories
    header, weights = stories_weights()
    weights["wcls"] = weights["tok_embeddings"] * 0.5  # a distinct classifier when untied
    header = dataclasses.replace(header, version=version, shared_classifier=shared,
                                 weights_offset=V1_HEADER_BYTES if version else header.weights_offset)
    other, _ = load_llama2c(write_checkpoint(tmp_path / "model.bin", header, weights), TOK)
    assert read_header((tmp_path / "model.bin").read_bytes(), "model.bin") == header
    ids = torch.tensor([[1, 400, 300, 301, 302, 5, 260]])
    with torch.no_grad():
        hidden, other_hidden = model.model(ids).last_hidden_state, other.model(ids).last_hidden_state
    assert torch.equal(hidden, other_hidden)
    assert other.config.tie_word_embeddings == shared
    expected_head = weights["tok_embeddings"] if shared else weights["wcls"]
    assert torch.equal(other.lm_head.weight, expected_head)


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c(tmp_path / "nope.bin", tmp_path / "tok.bin")
    with pytest.raises(FileNotFoundError, match="tok_missing.bin"):
        Llama2cTokenizer(tmp_path / "tok_missing.bin")


@needs_assets
def test_corrupt_checkpoints_raise_value_error(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(CKPT.read_bytes()[:-4])
    with pytest.raises(ValueError, match="implies 1056540 bytes, the file has 1056536"):
        load_llama2c(truncated, TOK)
    text = tmp_path / "notes.bin"
    text.write_text("this is a text file, not a checkpoint at all\n" * 3)
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        load_llama2c(text, TOK)
    header, weights = stories_weights()
    v2 = write_checkpoint(tmp_path / "v2.bin", dataclasses.replace(header, version=2, weights_offset=256), weights)
    with pytest.raises(ValueError, match="version 2 is not supported"):
        load_llama2c(v2, TOK)


@needs_assets
def test_tokenizer_must_fit_checkpoint(tmp_path):
    small = write_tokenizer(tmp_path / "tok.bin", [(b" ", 0.0)])
    with pytest.raises(ValueError, match="has 260 tokens but checkpoint .* has vocab_size 512"):
        load_llama2c(CKPT, small)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(TOK.read_bytes()[:103])  # cut inside a token record
    with pytest.raises(ValueError, match="not a llama2.c tokenizer file"):
        Llama2cTokenizer(broken)
