"""Teachers from GGUF files (llama.cpp's format), read by transformers' GGUF reader.

transformers dequantizes every tensor on load, but marks the model quantized (a GgufConfig in
`config.quantization_config`, an attached quantizer): such a model refuses save_pretrained and
carries a quantizer through everything done to it later. We rebuild a plain model of the same
class from the config without the quantization record and load the dequantized weights into
it, so a GGUF teacher is an ordinary Hugging Face model from here on: it trains against, casts,
moves and saves like a model read from a folder.

Needs the `gguf` and `accelerate` packages (`pip install -e '.[gguf]'`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel


def _reader_installed() -> None:
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading a GGUF teacher needs the packages {missing}: pip install -e '.[gguf]'")


def gguf_config(folder: str, gguf_file: str) -> PretrainedConfig:
    """The model config in the file's header (fast: no tensor is read)."""
    _reader_installed()
    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


def gguf_location(path: str | Path, gguf_file: str | None) -> tuple[str, str] | None:
    """(folder or hub id, file name) of a GGUF teacher, or None when it is not one: `path` is a
    .gguf file itself, or the folder / hub id holding `gguf_file` (transformers' convention)."""
    local = Path(path).expanduser()
    if gguf_file is not None:
        return str(local) if local.is_dir() else str(path), gguf_file
    if local.suffix == ".gguf":
        return str(local.parent), local.name
    return None


def plain_copy(quantized: PreTrainedModel) -> PreTrainedModel:
    """The same architecture and weights without the quantization record (config, quantizer)."""
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    dtype = next(quantized.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.load_state_dict(quantized.state_dict())  # tied embeddings stay tied: one tensor under two keys
    return model


def load_gguf(folder: str, gguf_file: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """(plain HF causal LM with the dequantized weights in `dtype`, the tokenizer stored in the file).

    folder: a local folder or hub id holding gguf_file. Loading converts the file's tokenizer too
    (tens of seconds for a 50k vocabulary on CPU): save the pair once with save_pretrained when the
    same GGUF is read often (jobs/fetch_smollm2.py writes such a folder).
    """
    _reader_installed()
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    model = plain_copy(quantized)
    del quantized
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

