"""The RWKV student LM: the teacher's embeddings, norms, MLPs and untied lm_head around
RWKV time-mix layers initialized from the teacher's attention (DESIGN §4).

Shapes: B batch, T time, C model width, V vocabulary, D teacher head_dim.
A time-mix class plugs in by name through TIME_MIX: it is built as cls(shape, cfg, layer_id),
is called as (x [B,T,C], rope (cos, sin), v_first) -> (out [B,T,C], v_first), and names the
teacher's attention weights it reuses exactly as the teacher's attention module does
(q_proj, k_proj, ...), so build_student copies them by state_dict key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from models.layers import GatedMLP, RMSNorm
from models.rad_rwkv7 import RadRWKV7
from models.teacher import check_teacher_family

TIME_MIX: dict[str, type[nn.Module]] = {"rad_rwkv7": RadRWKV7}


@dataclass
class StudentConfig:
    """User choices for the student; None fields are filled from the teacher by resolve()."""

    time_mix: str = "rad_rwkv7"
    head_size: int | None = None  # None = teacher head_dim; else a multiple of it
    groupnorm: bool = True  # False: y / sqrt(N) instead of GroupNorm_H(y)
    w_lora: int | None = None  # LoRA ranks; None = the DESIGN §4 formula of the model width
    a_lora: int | None = None
    v_lora: int | None = None
    g_lora: int | None = None
    backend: str = "auto"  # kernels.wkv7 backend


@dataclass(frozen=True)
class TeacherShape:
    """What the student needs to know about the teacher's architecture."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3-style per-head q_norm/k_norm

    @classmethod
    def of(cls, teacher: nn.Module) -> TeacherShape:
        """Read from a HF Llama-family causal LM (llama, qwen2, qwen3, mistral)."""
        c = teacher.config
        check_teacher_family(c)  # others may share key names but not the math (e.g. Gemma's 1 + w norms)
        layer = teacher.model.layers[0]
        attn = layer.self_attn
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=attn.head_dim, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
            qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
            mlp_bias=layer.mlp.gate_proj.bias is not None, qk_norm=hasattr(attn, "q_norm"),
        )


def lora_rank(factor: float, dim: int) -> int:
    """max(32, round(factor * sqrt(dim) / 32) * 32): the RWKV-7 LoRA size rule."""
    return max(32, round(factor * math.sqrt(dim) / 32) * 32)


def valid_head_sizes(shape: TeacherShape) -> list[int]:
    """Multiples of head_dim that group whole teacher heads: m * D with m dividing H_t."""
    return [m * shape.head_dim for m in range(1, shape.num_heads + 1) if shape.num_heads % m == 0]


def resolve(cfg: StudentConfig, shape: TeacherShape) -> StudentConfig:
    """cfg with every None filled in from the teacher; ValueError on invalid choices."""
    if cfg.time_mix not in TIME_MIX:
        raise ValueError(f"time_mix={cfg.time_mix!r} is unknown; valid: {sorted(TIME_MIX)}")
    head_size = shape.head_dim if cfg.head_size is None else cfg.head_size
    if head_size not in valid_head_sizes(shape):
        raise ValueError(f"head_size={cfg.head_size} must be a multiple of the teacher head_dim "
                         f"{shape.head_dim} dividing the attention width "
                         f"{shape.num_heads * shape.head_dim}; valid: {valid_head_sizes(shape)}")
    C = shape.hidden_size
    ranks = {"w_lora": lora_rank(2.5, C), "a_lora": lora_rank(2.5, C),
             "v_lora": lora_rank(1.7, C), "g_lora": lora_rank(5.0, C)}
    for name in ranks:
        given = getattr(cfg, name)
        if given is not None:
            if given < 1:
                raise ValueError(f"{name}={given} must be a positive LoRA rank")
            ranks[name] = given
    return dataclasses.replace(cfg, head_size=head_size, **ranks)


@dataclass
class StudentOutput:
    hidden_states: list[Tensor]  # residual stream after each block, [B, T, C] each
    last_hidden: Tensor  # after the final norm, [B, T, C]: logits = lm_head(last_hidden)


class Block(nn.Module):
    """h = h + time_mix(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__()
        C = shape.hidden_size
        self.input_layernorm = RMSNorm(C, shape.rms_norm_eps)
        self.time_mix = TIME_MIX[cfg.time_mix](shape, cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(C, shape.rms_norm_eps)
        self.mlp = GatedMLP(C, shape.intermediate_size, shape.hidden_act, shape.mlp_bias)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor],
                v_first: Tensor | None) -> tuple[Tensor, Tensor]:
        out, v_first = self.time_mix(self.input_layernorm(h), rope, v_first)
        h = h + out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, v_first


class StudentLM(nn.Module):
    """embed_tokens -> blocks -> norm -> lm_head (untied). Built by build_student()."""

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, rotary_emb: nn.Module) -> None:
        """cfg must be resolved; rotary_emb is a copy of the teacher's (buffers only)."""
        super().__init__()
        self.config = cfg
        self.shape = shape
        C = shape.hidden_size
        self.embed_tokens = nn.Embedding(shape.vocab_size, C)
        self.layers = nn.ModuleList(Block(shape, cfg, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(C, shape.rms_norm_eps)
        self.lm_head = nn.Linear(C, shape.vocab_size, bias=False)
        self.rotary_emb = rotary_emb

    def rope(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [1, T, D] in x's dtype, for positions 0..T-1 of x [B, T, C]."""
        positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, T]
        return self.rotary_emb(x, positions)

    def forward(self, input_ids: Tensor) -> StudentOutput:
        """input_ids: [B, T] -> residual after each block and the final normed hidden, [B, T, C]."""
        h = self.embed_tokens(input_ids)  # [B, T, C]
        rope = self.rope(h)
        v_first = None
        hidden_states = []
        for block in self.layers:
            h, v_first = block(h, rope, v_first)
            hidden_states.append(h)
        return StudentOutput(hidden_states, self.norm(h))

    def logits(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, T] -> [B, T, V] (materializes the full logits; for small inputs)."""
        return self.lm_head(self(input_ids).last_hidden)

    def time_mix_outputs(self, attn_inputs: list[Tensor]) -> list[Tensor]:
        """Layer i's time mix on attn_inputs[i] ([B, T, C] each, the teacher's normalized
        attention inputs); v_first comes from layer 0 on attn_inputs[0]. -> list of [B, T, C]."""
        rope = self.rope(attn_inputs[0])
        v_first = None
        outputs = []
        for block, x in zip(self.layers, attn_inputs, strict=True):
            out, v_first = block.time_mix(x, rope, v_first)
            outputs.append(out)
        return outputs

    def time_mix_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the align stage trains: every time-mix layer's, nothing else."""
        for block in self.layers:
            yield from block.time_mix.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_student(teacher: nn.Module, cfg: StudentConfig) -> StudentLM:
    """A StudentLM initialized from a HF Llama-family causal LM; its parameters are copies (lm_head
    untied) and the teacher is left untouched. They are trained, so they are float32 even for a
    bf16/fp16 teacher (the copy is exact); a float64 teacher gives a float64 student."""
    shape = TeacherShape.of(teacher)
    cfg = resolve(cfg, shape)
    dtype = torch.promote_types(teacher.model.embed_tokens.weight.dtype, torch.float32)
    student = StudentLM(shape, cfg, copy.deepcopy(teacher.model.rotary_emb)).to(dtype)
    loaded = student.load_state_dict(teacher_state(teacher), strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"teacher {type(teacher).__name__} has weights the student cannot hold: "
                         f"{loaded.unexpected_keys[:5]}")
    assert all(".time_mix." in key for key in loaded.missing_keys), loaded.missing_keys
    return student.to(teacher.model.embed_tokens.weight.device)


def teacher_state(teacher: nn.Module) -> dict[str, Tensor]:
    """The teacher's weights under the student's names (self_attn -> time_mix, no "model.")."""
    state = {}
    for key, value in teacher.state_dict().items():
        if "rotary_emb" in key:
            continue
        key = key.removeprefix("model.").replace(".self_attn.", ".time_mix.")
        state[key] = value
    return state
