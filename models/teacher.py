"""Teacher loading and the frozen teacher wrapper used by every distillation stage.

A teacher is a Hugging Face causal LM of the Llama family (llama, mistral, qwen2, qwen3) or a
llama2.c checkpoint converted to one (models/llama2c.py). `FrozenTeacher` runs its decoder once
per batch and hands back, per layer, what the student is trained against: the attention input,
the attention output and the residual stream, plus the final-normed hidden state (from which
logits are taken chunk by chunk by the losses, never as one [B, T, V] tensor here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from models.gguf import gguf_config, gguf_location, load_gguf
from models.llama2c import load_llama2c

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# "org/name" on the Hugging Face Hub: exactly one slash, no leading "." or "/".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_teacher_family(config: PretrainedConfig) -> None:
    """Raise ValueError unless `config.model_type` is a family we can distill from."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise ValueError(
            f"unsupported teacher architecture {arch!r} (model_type={model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_FAMILIES)}"
        )


def teacher_head_dim(config: PretrainedConfig) -> int:
    """Attention head size: `config.head_dim` when set (Qwen3, Mistral), else hidden / heads."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _load_llama2c_teacher(path: Path, tokenizer: str | None):
    if tokenizer is None:
        raise ValueError(
            f"llama2.c checkpoint {str(path)!r} needs its tokenizer: pass tokenizer=<path to the "
            "tokenizer .bin, e.g. tok512.bin>"
        )
    return load_llama2c(path, tokenizer)


def _load_hf_teacher(path: str, tokenizer: str | None, dtype: torch.dtype):
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"teacher folder {path!r} has no config.json: expected a Hugging Face model "
                                "folder (config.json, weights, tokenizer files)")
    check_teacher_family(AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(tokenizer or path)


def _load_gguf_teacher(folder: str, gguf_file: str, tokenizer: str | None, dtype: torch.dtype):
    if not (Path(folder) / gguf_file).is_file() and not _HUB_ID.match(folder):
        raise FileNotFoundError(f"GGUF teacher {gguf_file!r} not found in {folder!r}: expected a .gguf file, "
                                "or a folder or hub id 'org/name' holding gguf_file")
    check_teacher_family(gguf_config(folder, gguf_file))
    model, tok = load_gguf(folder, gguf_file, dtype)
    return model, AutoTokenizer.from_pretrained(tokenizer) if tokenizer else tok


def load_teacher(
    path: str | Path, *, tokenizer: str | None = None, dtype: str = "float32", gguf_file: str | None = None,
    made_by: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a frozen teacher and its tokenizer.

    `path` is a llama2.c checkpoint file (then `tokenizer` is its tokenizer .bin, required), a
    local Hugging Face folder, a hub id "org/name", or a GGUF file: a .gguf path, or the folder /
    hub id holding `gguf_file` (dequantized; its tokenizer comes from the same file unless
    `tokenizer` names another). Returns (model, tokenizer) with the model in eval mode, every
    parameter requires_grad False, weights in `dtype`. The tokenizer is an HF tokenizer or a
    `Llama2cTokenizer`: both meet the protocol of docs/architecture.md. made_by: the command that
    makes a local `path` (a converted teacher), named in the error when it is missing.
    """
    torch_dtype = _torch_dtype(dtype)
    local = Path(path).expanduser()
    if made_by is not None and not local.exists():
        raise FileNotFoundError(f"teacher {str(path)!r} not found: it is made by `{made_by}`")
    gguf = gguf_location(path, gguf_file)
    if gguf is not None:
        model, tok = _load_gguf_teacher(*gguf, tokenizer, torch_dtype)
    elif local.is_file():
        model, tok = _load_llama2c_teacher(local, tokenizer)
        model.to(torch_dtype)
    elif local.is_dir() or (_HUB_ID.match(str(path)) and local.suffix != ".bin"):
        model, tok = _load_hf_teacher(str(local) if local.is_dir() else str(path), tokenizer, torch_dtype)
    else:
        raise FileNotFoundError(
            f"teacher {str(path)!r} not found: expected a llama2.c .bin file, a Hugging Face model "
            "folder, or a hub id of the form 'org/name'"
        )
    return _freeze(model), tok


@dataclass
class TeacherOutput:
    """Per-layer teacher activations, each [B, T, C]; lists have one entry per decoder layer."""

    attn_inputs: list[torch.Tensor]  # normalized input of layer i's self-attention
    attn_outputs: list[torch.Tensor]  # that attention's output, after o_proj
    hidden_states: list[torch.Tensor]  # residual stream after block i
    last_hidden: torch.Tensor  # after the final norm: logits = lm_head(last_hidden)


def _first(x):
    # Decoder layers return a tensor in transformers 5 and a tuple before; attention a tuple.
    return x[0] if isinstance(x, tuple) else x


class FrozenTeacher(nn.Module):
    """A frozen HF causal LM that returns per-layer activations instead of logits.

    Hooks on every decoder layer and its self_attn record the activations; only the base model
    (`model.model`) runs, so no [B, T, V] logits are computed. The wrapper stays in eval mode
    whatever `train()` its parent is given.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        check_teacher_family(model.config)
        self.model = _freeze(model)
        self._record: dict[str, list[torch.Tensor]] | None = None
        for layer in self.model.model.layers:
            layer.self_attn.register_forward_hook(self._attn_hook, with_kwargs=True)
            layer.register_forward_hook(self._layer_hook)

    def _attn_hook(self, module, args, kwargs, output) -> None:
        if self._record is not None:
            # transformers 5 passes hidden_states as a keyword; older versions positionally.
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._record["attn_inputs"].append(x)
            self._record["attn_outputs"].append(_first(output))

    def _layer_hook(self, module, args, output) -> None:
        if self._record is not None:
            self._record["hidden_states"].append(_first(output))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> TeacherOutput:
        """input_ids [B, T] → TeacherOutput (lists of L tensors [B, T, C], last_hidden [B, T, C])."""
        self._record = {"attn_inputs": [], "attn_outputs": [], "hidden_states": []}
        try:
            last_hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state
            record = self._record
        finally:
            self._record = None
        return TeacherOutput(**record, last_hidden=last_hidden)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size
