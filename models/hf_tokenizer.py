"""The llama2.c tokenizer as a Hugging Face tokenizer, so an exported llama2.c student loads with
AutoTokenizer and encodes to the same ids (distill-export).

run.c's encoder is sentencepiece-style BPE: " " + text, one symbol per character (byte-fallback
tokens <0xXX> for characters without a piece), then repeatedly the adjacent pair whose merged piece
scores highest. A tokenizers BPE model does the same when every way of splitting a piece into two
pieces is a merge ranked by that piece's score (llama2.c scores are distinct: -rank).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from models.llama2c import BOS_ID, BYTE_TOKEN_OFFSET, EOS_ID, UNK_ID, Llama2cTokenizer


def bpe_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split a + b of each multi-character piece into two pieces, best-scoring piece first."""
    ranked = []
    for piece, i in vocab.items():
        if i < BYTE_TOKEN_OFFSET + 256:  # specials and byte tokens are never merge results
            continue
        ranked += [(-scores[i], i, piece[:j], piece[j:]) for j in range(1, len(piece))
                   if piece[:j] in vocab and piece[j:] in vocab]
    return [(a, b) for *_, a, b in sorted(ranked)]


def llama2c_to_hf(tok: Llama2cTokenizer) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast with tok's ids: encode, BOS template, decode (leading space dropped)."""
    vocab = tok.get_vocab()
    if len(vocab) != len(tok):
        raise ValueError(f"tokenizer {tok.name_or_path!r} has pieces that are not distinct UTF-8 strings; "
                         "it cannot become a Hugging Face BPE vocabulary")
    bpe = Tokenizer(models.BPE(vocab, bpe_merges(vocab, tok.scores), unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Prepend(" ")
    bpe.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    names = {i: tok.special_tokens[i] for i in (UNK_ID, BOS_ID, EOS_ID)}
    bpe.post_processor = processors.TemplateProcessing(single=f"{names[BOS_ID]} $A",
                                                       special_tokens=[(names[BOS_ID], BOS_ID)])
    # split_special_tokens: run.c encodes a literal "<s>" in text as characters, never as BOS
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=names[UNK_ID], bos_token=names[BOS_ID],
                                   eos_token=names[EOS_ID], pad_token=names[UNK_ID], split_special_tokens=True)
