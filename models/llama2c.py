"""llama2.c checkpoints (karpathy/tinyllamas) as Hugging Face LlamaForCausalLM, and their tokenizer.

Checkpoint formats (all little-endian, weights float32):
  legacy: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); a negative
          vocab_size means an untied classifier follows. Weights: tok_embeddings, rms_att, wq, wk,
          wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag, [wcls].
  v1:     uint32 magic "ak42", int32 version 1, the same 7 int32, uint8 shared_classifier, zero pad
          to 256 bytes. Weights: rms_att, rms_ffn, rms_final, tok_embeddings, wq, wk, wv, wo, w1,
          w2, w3, [wcls].
Per-layer arrays are stored layer after layer, so each reads as one [L, ...] block.

llama2.c rotates consecutive pairs (x[2i], x[2i+1]); HF Llama rotates halves (x[i], x[i + d/2]).
Permuting the rows of wq and wk inside each head turns one convention into the other.
"""

from __future__ import annotations

import heapq
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

V1_MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_TOKEN_OFFSET = 3  # ids 3..258 are the byte-fallback tokens <0x00>..<0xFF>
_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy
    weights_offset: int  # byte offset of the first weight

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _file_bytes(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c {what} not found: {str(path)!r}")
    return path.read_bytes()


def read_header(data: bytes, path: str | Path) -> Llama2cHeader:
    """Parse the legacy or v1 header at the start of `data` (the bytes of `path`)."""
    if len(data) < LEGACY_HEADER_BYTES + 4:
        raise ValueError(f"{str(path)!r} is not a llama2.c checkpoint: only {len(data)} bytes")
    if struct.unpack_from("<I", data, 0)[0] == V1_MAGIC:
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise ValueError(f"{str(path)!r}: llama2.c checkpoint version {version} is not supported (legacy or 1)")
        params = struct.unpack_from("<7i", data, 8)
        shared = bool(data[8 + LEGACY_HEADER_BYTES])
        offset = V1_HEADER_BYTES
    else:
        version, params, offset = 0, struct.unpack_from("<7i", data, 0), LEGACY_HEADER_BYTES
        shared = params[5] > 0
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = params
    header = Llama2cHeader(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len,
                           shared, version, offset)
    _check_header(header, path)
    return header


def _check_header(h: Llama2cHeader, path: str | Path) -> None:
    sizes = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len)
    if min(sizes) <= 0 or h.dim % h.n_heads or h.n_heads % h.n_kv_heads or h.head_dim % 2:
        raise ValueError(
            f"{str(path)!r} is not a llama2.c checkpoint: header (dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, seq_len) = {sizes} needs positive sizes, n_heads dividing dim, "
            "n_kv_heads dividing n_heads and an even head size"
        )


def weight_layout(h: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array in file order; per-layer arrays as [L, ...]."""
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    attn = [("wq", (L, D, D)), ("wk", (L, h.kv_dim, D)), ("wv", (L, h.kv_dim, D)), ("wo", (L, D, D))]
    ffn = [("w1", (L, F, D)), ("w2", (L, D, F)), ("w3", (L, F, D))]
    if h.version == 0:
        freqs = [("freq_cis_real", (h.seq_len, h.head_dim // 2)), ("freq_cis_imag", (h.seq_len, h.head_dim // 2))]
        layout = [("tok_embeddings", (V, D)), ("rms_att", (L, D)), *attn, ("rms_ffn", (L, D)), *ffn,
                  ("rms_final", (D,)), *freqs]
    else:
        layout = [("rms_att", (L, D)), ("rms_ffn", (L, D)), ("rms_final", (D,)), ("tok_embeddings", (V, D)),
                  *attn, *ffn]
    return layout if h.shared_classifier else [*layout, ("wcls", (V, D))]


def read_weights(data: bytes, h: Llama2cHeader, path: str | Path) -> dict[str, torch.Tensor]:
    """Slice the float32 arrays of `weight_layout(h)` out of `data`; the size must match exactly."""
    layout = weight_layout(h)
    n_floats = sum(torch.Size(shape).numel() for _, shape in layout)
    expected = h.weights_offset + 4 * n_floats
    if len(data) != expected:
        raise ValueError(
            f"{str(path)!r} is not a llama2.c checkpoint: its header {h} implies {expected} bytes, "
            f"the file has {len(data)}"
        )
    flat = torch.frombuffer(bytearray(data[h.weights_offset:]), dtype=torch.float32)  # [n_floats]
    weights, start = {}, 0
    for name, shape in layout:
        n = torch.Size(shape).numel()
        weights[name] = flat[start:start + n].view(shape)
        start += n
    return weights


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection [n_heads * d, C] from pair-interleaved RoPE
    (rows 2i, 2i+1 rotate together) to HF's rotate_half (rows i, i + d/2 rotate together)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_config(h: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads, num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_dim, max_position_embeddings=h.seq_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
        tie_word_embeddings=h.shared_classifier, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )


def hf_state_dict(w: dict[str, torch.Tensor], h: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Map llama2.c arrays to LlamaForCausalLM parameter names."""
    sd = {
        "model.embed_tokens.weight": w["tok_embeddings"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["tok_embeddings"] if h.shared_classifier else w["wcls"],
    }
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": permute_rotary(w["wq"][i], h.n_heads),
            p + "self_attn.k_proj.weight": permute_rotary(w["wk"][i], h.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        }
    return sd


class Llama2cTokenizer:
    """The llama2.c tokenizer (tokenizer.bin: int32 max_token_length, then per token float32 score,
    int32 length, bytes), encoding and decoding exactly as llama2.c run.c does.

    Meets the project tokenizer protocol (docs/architecture.md). There is no pad token in
    llama2.c; <unk> (id 0) serves, since byte fallback means encode() never emits it.
    """

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = UNK_ID
    special_tokens = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}

    def __init__(self, path: str | Path):
        data = _file_bytes(path, "tokenizer")
        self.name_or_path = str(path)
        self.pieces, self.scores = _read_pieces(data, path)
        self._id_of: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._id_of.setdefault(piece, i)
        self._raw = [self._raw_bytes(i) for i in range(len(self.pieces))]

    def _raw_bytes(self, i: int) -> bytes:
        byte = _BYTE_PIECE.match(self.pieces[i])
        return bytes([int(byte.group(1), 16)]) if byte else self.pieces[i]

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i, piece in enumerate(self.pieces):
            vocab.setdefault(self.special_tokens.get(i, piece.decode("utf-8", "replace")), i)
        return vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """run.c encode: " " + text (when non-empty), one piece per UTF-8 character or its bytes
        (id = byte + 3), then greedy highest-score pair merges; BOS first if add_special_tokens."""
        bos = [BOS_ID] if add_special_tokens else []
        if not text:
            return bos
        ids: list[int] = []
        for char in " " + text:
            utf8 = char.encode("utf-8")
            piece = self._id_of.get(utf8)
            ids.extend([piece] if piece is not None else [b + BYTE_TOKEN_OFFSET for b in utf8])
        return bos + self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece,
        leftmost on ties (run.c's rule), with a heap instead of run.c's O(n^2) rescans.

        Symbols keep the index of their first character, so a smaller index is further left; a
        heap entry is stale when its two symbols no longer sit side by side as they were.
        """
        syms = [self.pieces[i] for i in ids]  # bytes of each live symbol (None once absorbed)
        nxt = list(range(1, len(ids) + 1))
        prv = list(range(-1, len(ids) - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            if i < 0 or nxt[i] >= len(ids):
                return
            j = nxt[i]
            merged = self._id_of.get(syms[i] + syms[j])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], i, j, merged))

        for i in range(len(ids) - 1):
            push(i)
        while heap:
            _, i, j, merged = heapq.heappop(heap)
            if syms[i] is None or syms[j] is None or nxt[i] != j or syms[i] + syms[j] != self.pieces[merged]:
                continue
            ids[i], syms[i], syms[j] = merged, self.pieces[merged], None
            nxt[i] = nxt[j]
            if nxt[i] < len(ids):
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [ids[i] for i in range(len(ids)) if syms[i] is not None]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """run.c decode: byte tokens become raw bytes, and the leading space of a piece that follows
        BOS is dropped. As in sentencepiece, so is that of the first piece: it is the space encode()
        prepends, which makes decode(encode(s)) == s."""
        out, prev = bytearray(), BOS_ID
        for i in (int(t) for t in ids):
            if i in self.special_tokens:
                out += b"" if skip_special_tokens else self.special_tokens[i].encode()
            else:
                raw = self._raw[i]
                out += raw[1:] if prev == BOS_ID and raw.startswith(b" ") else raw
            prev = i
        return out.decode("utf-8", errors="replace")


def _read_pieces(data: bytes, path: str | Path) -> tuple[list[bytes], list[float]]:
    """Parse a llama2.c tokenizer file into its pieces (bytes) and their float32 scores."""
    pieces, scores, offset = [], [], 4
    try:
        max_len = struct.unpack_from("<i", data, 0)[0]
        while offset < len(data):
            score, n = struct.unpack_from("<fi", data, offset)
            if not 0 < n <= max_len or offset + 8 + n > len(data):
                raise struct.error(f"token {len(pieces)} has length {n}")
            pieces.append(data[offset + 8:offset + 8 + n])
            scores.append(score)
            offset += 8 + n
    except struct.error as err:
        raise ValueError(f"{str(path)!r} is not a llama2.c tokenizer file ({err}); expected int32 "
                         "max_token_length, then per token float32 score, int32 length, bytes") from None
    if len(pieces) <= EOS_ID:
        raise ValueError(f"{str(path)!r} is not a llama2.c tokenizer file: only {len(pieces)} tokens")
    return pieces, scores


def load_llama2c(checkpoint: str | Path, tokenizer: str | Path) -> tuple[LlamaForCausalLM, Llama2cTokenizer]:
    """Load a llama2.c checkpoint (legacy or v1) and its tokenizer .bin as an fp32 HF LlamaForCausalLM
    (eval mode) and a `Llama2cTokenizer`."""
    data = _file_bytes(checkpoint, "checkpoint")
    header = read_header(data, checkpoint)
    tok = Llama2cTokenizer(tokenizer)
    if len(tok) != header.vocab_size:
        raise ValueError(f"tokenizer {str(tokenizer)!r} has {len(tok)} tokens but checkpoint "
                         f"{str(checkpoint)!r} has vocab_size {header.vocab_size}")
    model = LlamaForCausalLM(llama_config(header))
    model.load_state_dict(hf_state_dict(read_weights(data, header, checkpoint), header))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=UNK_ID)
    return model.eval(), tok
