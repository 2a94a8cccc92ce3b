"""The RWKV student LM: the teacher's embeddings, norms, MLPs and untied lm_head around
RWKV time-mix layers initialized from the teacher's attention (DESIGN §4); a hybrid keeps the
teacher's softmax attention in the layers listed in `attention_layers`.

Shapes: B batch, T time, C model width, V vocabulary, D teacher head_dim.

Recurrent state protocol. A time-mix class plugs in by name through TIME_MIX: it is built as
cls(shape, cfg, layer_id) and called as
    (x [B,T,C], rope (cos, sin) [1,T,D] at the tokens' absolute positions, v_first [B,T,A] | None,
     state: dict[str, Tensor] | None) -> (out [B,T,C], v_first, new_state: dict[str, Tensor])
(A = the teacher's attention width, H_t * D; = C for most teachers)
where state None starts a fresh sequence (an RWKV layer from its learned `initial_state` [H, N, N]
with StudentConfig.learned_initial_state, else from zeros) and new_state fully describes the layer
after the last of the T tokens (e.g. {"wkv": [B,H,N,N]}, + {"shift": [B,C]} with token shift; the KV cache {"k", "v"}
for kept attention). It names the teacher's attention weights it reuses exactly as the teacher's
attention module does (q_proj, k_proj, ...), so build_student copies them by state_dict key.
Its class attribute `uses_rope` says whether it reads rope, i.e. whether its output depends on the
absolute position (a one-token ONNX step then takes the position as an input).
An FFN plugs in through FFN: built as FFN[name](shape, cfg, layer_id), called as
(x [B,T,C], state) -> (out [B,T,C], new_state) ({} when stateless, like the teacher's MLP).
v_first: the v of the first layer that is not kept attention (StudentConfig.v_first_layer);
kept attention layers before it pass None through, later ones pass v_first through.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from models.attention import TeacherAttention
from models.channel_mix import RWKV7ChannelMix
from models.layers import GatedMLP, RMSNorm
from models.rad_rwkv6 import RadRWKV6
from models.rad_rwkv7 import RadRWKV7
from models.rwkv7 import RWKV7TimeMix
from models.teacher import check_teacher_family


def teacher_mlp(shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> GatedMLP:
    """The teacher's gated MLP (weights copied by build_student)."""
    return GatedMLP(shape.hidden_size, shape.intermediate_size, shape.hidden_act, shape.mlp_bias)


TIME_MIX: dict[str, type[nn.Module]] = {
    "rad_rwkv7": RadRWKV7,
    "rwkv7": RWKV7TimeMix,
    "rad_rwkv6": RadRWKV6,
}
FFN: dict[str, Callable[[TeacherShape, StudentConfig, int], nn.Module]] = {
    "teacher": teacher_mlp,
    "rwkv": RWKV7ChannelMix,
}
LAYER_NORM_EPS = 1e-5  # RWKV-7's (the `rwkv` package and fla use it too)
NORMS: dict[str, Callable[[TeacherShape], nn.Module]] = {
    "rms": lambda shape: RMSNorm(shape.hidden_size, shape.rms_norm_eps),
    "layer": lambda shape: nn.LayerNorm(shape.hidden_size, eps=LAYER_NORM_EPS),
}
INITS = ("teacher", "scratch")


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
    attention_layers: list[int] = field(default_factory=list)  # hybrid: keep the teacher's attention here
    ffn: str = "teacher"  # key of FFN: "teacher" = its MLP, copied; "rwkv" = RWKV-7 channel mix, new
    norm: str = "rms"  # key of NORMS: "rms" = the teacher's RMSNorms; "layer" = LayerNorms + ln0 (plain RWKV-7)
    init: str = "teacher"  # "scratch": what would be copied from the teacher is random instead (a baseline)
    # Each RWKV layer learns the WKV state a fresh sequence starts from ([H, N, N], zeros at init), for
    # state tuning; False (older checkpoints and exports) starts from zeros.
    learned_initial_state: bool = False

    @property
    def v_first_layer(self) -> int:
        """The layer whose v is v_first: the first one that is not kept attention (the value
        residual is an RWKV-7 piece; softmax layers have nothing to mix it into). Equals the
        number of layers when every layer is kept attention: then no layer asks for it."""
        return next(i for i in itertools.count() if i not in self.attention_layers)


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
    sliding_windows: tuple[int | None, ...] | None = None  # per layer; None: full causal everywhere

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
            sliding_windows=sliding_windows(teacher),
        )


def sliding_windows(teacher: nn.Module) -> tuple[int | None, ...] | None:
    """Each layer's attention window, None when no layer has one. Qwen2/3 set it per attention
    module (None in full-attention layers); Mistral only in the config, for every layer."""
    every_layer = getattr(teacher.config, "sliding_window", None)
    windows = tuple(getattr(layer.self_attn, "sliding_window", every_layer) for layer in teacher.model.layers)
    return None if all(w is None for w in windows) else windows


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
    if cfg.ffn not in FFN:
        raise ValueError(f"ffn={cfg.ffn!r} is unknown; valid: {sorted(FFN)}")
    if cfg.norm not in NORMS:
        raise ValueError(f"norm={cfg.norm!r} is unknown; valid: {sorted(NORMS)}")
    if cfg.init not in INITS:
        raise ValueError(f"init={cfg.init!r} is unknown; valid: {list(INITS)}")
    L = shape.num_layers
    if any(not isinstance(i, int) or not 0 <= i < L for i in cfg.attention_layers):
        raise ValueError(f"attention_layers={list(cfg.attention_layers)} must be layer indices of the "
                         f"teacher; valid: 0..{L - 1}")
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
    return dataclasses.replace(cfg, head_size=head_size, attention_layers=sorted(set(cfg.attention_layers)),
                               **ranks)


@dataclass
class StudentState:
    """A batch of sequences after the tokens seen so far: forward(next_ids, state) continues them."""

    position: int | Tensor  # absolute position of the next token = tokens seen so far (a 0-d int64
    # tensor when the step is traced for ONNX, where it is a graph input)
    time_mix: list[dict[str, Tensor]]  # per layer, e.g. {"wkv": [B, H, N, N]} or {"k", "v"} KV cache
    ffn: list[dict[str, Tensor]]  # per layer, {} for the teacher's MLP


@dataclass
class StudentOutput:
    hidden_states: list[Tensor]  # residual stream after each block, [B, T, C] each
    last_hidden: Tensor  # after the final norm, [B, T, C]: logits = lm_head(last_hidden)
    state: StudentState  # after the last token: pass it to continue the sequences


class Block(nn.Module):
    """h = h + time_mix(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, layer_id: int) -> None:
        super().__init__()
        time_mix = TeacherAttention if layer_id in cfg.attention_layers else TIME_MIX[cfg.time_mix]
        self.input_layernorm = NORMS[cfg.norm](shape)
        self.time_mix = time_mix(shape, cfg, layer_id)
        self.post_attention_layernorm = NORMS[cfg.norm](shape)
        self.mlp = FFN[cfg.ffn](shape, cfg, layer_id)

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                time_mix_state: dict[str, Tensor] | None = None, ffn_state: dict[str, Tensor] | None = None,
                ) -> tuple[Tensor, Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """h: [B, T, C] -> (h [B, T, C], v_first, new time-mix state, new FFN state)."""
        out, v_first, time_mix_state = self.time_mix(self.input_layernorm(h), rope, v_first, time_mix_state)
        h = h + out
        out, ffn_state = self.mlp(self.post_attention_layernorm(h), ffn_state)
        return h + out, v_first, time_mix_state, ffn_state


class StudentLM(nn.Module):
    """embed_tokens -> (ln0) -> blocks -> norm -> lm_head (untied). Built by build_student().
    ln0, a LayerNorm of the embeddings, exists only with norm="layer": RWKV-7 has it, and the
    native runtimes apply it, so a plain RWKV-7 student must carry it."""

    def __init__(self, shape: TeacherShape, cfg: StudentConfig, rotary_emb: nn.Module) -> None:
        """cfg must be resolved; rotary_emb is a copy of the teacher's (buffers only)."""
        super().__init__()
        self.config = cfg
        self.shape = shape
        C = shape.hidden_size
        self.embed_tokens = nn.Embedding(shape.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=LAYER_NORM_EPS) if cfg.norm == "layer" else None
        self.layers = nn.ModuleList(Block(shape, cfg, i) for i in range(shape.num_layers))
        self.norm = NORMS[cfg.norm](shape)
        self.lm_head = nn.Linear(C, shape.vocab_size, bias=False)
        self.rotary_emb = rotary_emb

    def rope(self, x: Tensor, start: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [1, T, D] in x's dtype, for positions start..start+T-1 of x [B, T, C]
        (start an int or a 0-d tensor)."""
        positions = (start + torch.arange(x.shape[1], device=x.device))[None]  # [1, T]
        return self.rotary_emb(x, positions)

    def forward(self, input_ids: Tensor, state: StudentState | None = None) -> StudentOutput:
        """input_ids: [B, T] -> residual after each block and the final normed hidden, [B, T, C],
        and the state after the last token. state None starts fresh sequences; a state from an
        earlier call continues them (same outputs as one forward over all the tokens)."""
        start = 0 if state is None else state.position
        h = self.embed_tokens(input_ids)  # [B, T, C]
        if self.ln0 is not None:
            h = self.ln0(h)
        rope = self.rope(h, start)
        v_first = None
        hidden_states, time_mix_states, ffn_states = [], [], []
        for i, block in enumerate(self.layers):
            carried = (None, None) if state is None else (state.time_mix[i], state.ffn[i])
            h, v_first, time_mix_state, ffn_state = block(h, rope, v_first, *carried)
            hidden_states.append(h)
            time_mix_states.append(time_mix_state)
            ffn_states.append(ffn_state)
        new_state = StudentState(start + input_ids.shape[1], time_mix_states, ffn_states)
        return StudentOutput(hidden_states, self.norm(h), new_state)

    def logits(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, T] -> [B, T, V] (materializes the full logits; for small inputs)."""
        return self.lm_head(self(input_ids).last_hidden)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Greedy decoding (temperature 0) or sampling from softmax(logits / temperature):
        input_ids [B, T] -> [B, T + n], n <= max_new_tokens new tokens.

        One parallel forward over the prompt, then one token per forward from the recurrent
        state: constant memory per token in RWKV layers, a growing KV cache in kept attention
        layers. A row that emits eos_token_id continues with it; decoding stops early once every
        row has emitted it."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        ids, out = input_ids, self(input_ids)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B]
        for step in range(max_new_tokens):
            logits = self.lm_head(out.last_hidden[:, -1]).float()  # [B, V]
            if temperature > 0:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(-1)  # [B]
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            ids = torch.cat((ids, token[:, None]), dim=1)
            if step + 1 == max_new_tokens or done.all():
                break
            out = self(token[:, None], out.state)
        return ids

    def time_mix_outputs(self, attn_inputs: list[Tensor]) -> list[Tensor]:
        """Layer i's time mix on attn_inputs[i] ([B, T, C] each, the teacher's normalized
        attention inputs; a kept attention layer is its trainable copy); v_first comes from
        layer cfg.v_first_layer on its own input. -> list of [B, T, C] in the student's dtype
        (a bf16 teacher's inputs are widened to it)."""
        dtype = self.embed_tokens.weight.dtype
        rope = self.rope(attn_inputs[0].to(dtype))
        v_first = None
        outputs = []
        for block, x in zip(self.layers, attn_inputs, strict=True):
            out, v_first, _ = block.time_mix(x.to(dtype), rope, v_first)
            outputs.append(out)
        return outputs

    def time_mix_parameters(self) -> Iterator[nn.Parameter]:
        """The converted (RWKV) time mixes' parameters: what the align stage trains. Kept attention
        layers are left out: they start as exact copies, where the gradient of the non-squared L2
        has length 1 in the direction of rounding noise, so Adam would move them off the teacher
        (measured: error 2e-16 -> 0.3 after one step at lr 1e-2); they train with everything else
        in the kl stages."""
        for i, block in enumerate(self.layers):
            if i not in self.config.attention_layers:
                yield from block.time_mix.parameters()

    def new_parameters(self) -> Iterator[nn.Parameter]:
        """time_mix_parameters() plus the FFNs when cfg.ffn is not the teacher's MLP (then they are
        new and untrained), and the norms when they are LayerNorms (the teacher's RMSNorm weights
        with a new bias, and ln0): every parameter that does not already do the teacher's job. The
        trainer decides what a stage trains; note the align loss (time_mix_outputs) runs no FFN,
        so new FFNs learn only from losses over the full forward (kl, finetune)."""
        yield from self.time_mix_parameters()
        if self.config.ffn != "teacher":
            for block in self.layers:
                yield from block.mlp.parameters()
        if self.config.norm != "rms":
            for norm in (self.ln0, self.norm, *(n for b in self.layers
                                                for n in (b.input_layernorm, b.post_attention_layernorm))):
                yield from norm.parameters()

    def initial_state_parameters(self) -> Iterator[nn.Parameter]:
        """Each RWKV layer's learned initial WKV state [H, N, N] (none without cfg.learned_initial_state;
        kept attention layers have no WKV state): what state tuning trains. Costs nothing per token."""
        for block in self.layers:
            initial = getattr(block.time_mix, "initial_state", None)
            if initial is not None:
                yield initial

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_student(teacher: nn.Module, cfg: StudentConfig) -> StudentLM:
    """A StudentLM initialized from a HF Llama-family causal LM; its parameters are copies (lm_head
    untied) and the teacher is left untouched. They are trained, so they are float32 even for a
    bf16/fp16 teacher (the copy is exact); a float64 teacher gives a float64 student.
    cfg.init "scratch" copies from a randomly initialized model of the teacher's class and config
    instead (its own init, e.g. HF Llama's normal(0, initializer_range)): the same student
    architecture trained from scratch, the baseline that distillation is measured against."""
    shape = TeacherShape.of(teacher)
    cfg = resolve(cfg, shape)
    device = teacher.model.embed_tokens.weight.device
    if cfg.init == "scratch":
        teacher = type(teacher)(copy.deepcopy(teacher.config)).to(teacher.model.embed_tokens.weight.dtype)
    dtype = torch.promote_types(teacher.model.embed_tokens.weight.dtype, torch.float32)
    student = StudentLM(shape, cfg, copy.deepcopy(teacher.model.rotary_emb)).to(dtype)
    loaded = student.load_state_dict(teacher_state(teacher, cfg), strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"teacher {type(teacher).__name__} has weights the student cannot hold: "
                         f"{loaded.unexpected_keys[:5]}")
    params, new = dict(student.named_parameters()), {id(p) for p in student.new_parameters()}
    assert all(id(params[key]) in new for key in loaded.missing_keys), loaded.missing_keys
    return student.to(device)


def teacher_state(teacher: nn.Module, cfg: StudentConfig) -> dict[str, Tensor]:
    """The teacher's weights under the student's names (self_attn -> time_mix, no "model."),
    without its MLPs when the student's FFN is not the teacher's. LayerNorms (norm="layer") take
    the RMSNorm weights (bias 0); ln0's weight is the teacher's embedding rows' mean standard
    deviation, so that at init ln0 only re-centres each embedding and scales it to the typical size."""
    state = {}
    for key, value in teacher.state_dict().items():
        if "rotary_emb" in key or (".mlp." in key and cfg.ffn != "teacher"):
            continue
        key = key.removeprefix("model.").replace(".self_attn.", ".time_mix.")
        state[key] = value
    if cfg.norm == "layer":
        embeddings = teacher.model.embed_tokens.weight.float()  # [V, C]
        scale = embeddings.std(dim=-1, unbiased=False).mean()
        state["ln0.weight"] = torch.full_like(embeddings[0], scale.item())
    return state
