"""distill-export format=rwkv and format=fla: a plain RWKV-7 student (student=rwkv7_native) under
the native RWKV-7 key layout (the `rwkv` package, RWKV-LM) or fla's RWKV7ForCausalLM folder.

Both hold exactly: LayerNorms with ln0, RWKV-7 time mixes with r/k/v/o at the model width and no
biases, RWKV-7 channel mixes, GroupNorm ln_x. `native_mismatches` names what a student has beyond
that; such a student exports with format=hf only.

Shapes: C model width, A attention width, H heads of size N, F channel-mix width, r LoRA ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from models.student import LAYER_NORM_EPS, StudentLM

LORAS = ("w", "a", "v", "g")
LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
PROJECTIONS = {"q_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
FLA_PROJECTIONS = {"q_proj": "r_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}
TIME_MIX_DIFFERENCES = {
    "rad_rwkv7": "time_mix='rad_rwkv7' (RoPE on r and k, and k/v at the teacher's GQA width: the native "
                 "RWKV-7 time mix has neither)",
    "rad_rwkv6": "time_mix='rad_rwkv6' (an RWKV-6 time mix)",
}


def native_mismatches(student: StudentLM, fmt: str) -> list[str]:
    """What keeps `student` from being a plain RWKV-7 model in format `fmt` ("rwkv" | "fla")."""
    cfg, shape = student.config, student.shape
    found = []
    if cfg.time_mix != "rwkv7":
        found.append(TIME_MIX_DIFFERENCES.get(cfg.time_mix, f"time_mix={cfg.time_mix!r}"))
    if cfg.attention_layers:
        found.append(f"kept softmax attention in layers {cfg.attention_layers}")
    if cfg.ffn != "rwkv":
        found.append(f"ffn={cfg.ffn!r} (the teacher's gated MLP; RWKV-7 has a channel mix: ffn=rwkv)")
    if cfg.norm != "layer":
        found.append(f"norm={cfg.norm!r} (RMSNorm; RWKV-7 has LayerNorms and ln0: norm=layer)")
    if not cfg.groupnorm:
        found.append("groupnorm=false (RWKV-7 normalizes each head with its GroupNorm ln_x)")
    if shape.qkv_bias or shape.o_bias:
        found.append("the teacher's q/k/v/o biases (Qwen2-style)")
    if shape.qk_norm:
        found.append("the teacher's q/k norms (Qwen3-style)")
    if cfg.learned_initial_state:
        found.append("learned_initial_state=true (the native layouts hold no initial WKV state: every sequence "
                     "starts from zeros there)")
    if shape.num_heads * shape.head_dim != shape.hidden_size:
        found.append(f"attention width {shape.num_heads * shape.head_dim} != model width {shape.hidden_size}")
    if fmt == "fla" and cfg.head_size * LAYER_NORM_EPS != 64e-5:
        found.append(f"head_size={cfg.head_size} (fla sets its GroupNorm eps to head_dim x norm_eps, so the "
                     f"GroupNorm eps 64e-5 and LayerNorm eps {LAYER_NORM_EPS} hold together only at head_size=64)")
    return found


def check_native(student: StudentLM, fmt: str) -> None:
    found = native_mismatches(student, fmt)
    if found:
        raise ValueError(f"format={fmt} cannot hold this student exactly: {'; '.join(found)}. Train "
                         "student=rwkv7_native (from a teacher without biases or q/k norms" +
                         (", head_size=64" if fmt == "fla" else "") +
                         ") for this format, or export with format=hf, which holds every student")


def rwkv_state_dict(student: StudentLM) -> dict[str, Tensor]:
    """The native RWKV-7 .pth layout (RWKV-LM's x070, the `rwkv` package): vectors as [1, 1, C],
    LoRAs as x @ w1 [C, r] then @ w2 [r, C], r_k [H, N], Linear weights [out, in]."""
    sd = {"emb.weight": student.embed_tokens.weight, "blocks.0.ln0.weight": student.ln0.weight,
          "blocks.0.ln0.bias": student.ln0.bias}
    for i, block in enumerate(student.layers):
        b, tm, C = f"blocks.{i}.", block.time_mix, student.shape.hidden_size
        for name, norm in (("ln1", block.input_layernorm), ("ln2", block.post_attention_layernorm)):
            sd |= {b + f"{name}.weight": norm.weight, b + f"{name}.bias": norm.bias}
        sd |= {b + f"att.{name}": getattr(tm, name).view(1, 1, C) for name in (*LERPS, "k_k", "k_a")}
        for x in LORAS:
            lora = getattr(tm, f"{x}_lora")
            if lora is None:  # the v_first layer mixes nothing in; native files still carry v0..v2, unread
                r = student.config.v_lora
                sd |= {b + "att.v0": torch.zeros(1, 1, C), b + "att.v1": torch.zeros(C, r), b + "att.v2": torch.zeros(r, C)}
                continue
            sd |= {b + f"att.{x}1": lora.down, b + f"att.{x}2": lora.up}
            if lora.bias is not None:
                sd[b + f"att.{x}0"] = lora.bias.view(1, 1, C)
        sd |= {b + f"att.{native}.weight": getattr(tm, ours).weight for ours, native in PROJECTIONS.items()}
        sd |= {b + "att.r_k": tm.r_k, b + "att.ln_x.weight": tm.ln_x.weight, b + "att.ln_x.bias": tm.ln_x.bias,
               b + "ffn.x_k": block.mlp.x_k.view(1, 1, C), b + "ffn.key.weight": block.mlp.key.weight,
               b + "ffn.value.weight": block.mlp.value.weight}
    sd |= {"ln_out.weight": student.norm.weight, "ln_out.bias": student.norm.bias, "head.weight": student.lm_head.weight}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def fla_state_dict(student: StudentLM) -> dict[str, Tensor]:
    """fla's RWKV7ForCausalLM keys: LoRAs as nn.Sequential(Linear(C, r), act, Linear(r, C)), so
    lora.0.weight = down^T [r, C], lora.2.weight = up^T [C, r], lora.2.bias = bias; ln0 is layer 0's pre_norm."""
    sd = {"model.embeddings.weight": student.embed_tokens.weight,
          "model.layers.0.pre_norm.weight": student.ln0.weight, "model.layers.0.pre_norm.bias": student.ln0.bias}
    for i, block in enumerate(student.layers):
        b, tm, C = f"model.layers.{i}.", block.time_mix, student.shape.hidden_size
        for name, norm in (("attn_norm", block.input_layernorm), ("ffn_norm", block.post_attention_layernorm)):
            sd |= {b + f"{name}.weight": norm.weight, b + f"{name}.bias": norm.bias}
        sd |= {b + f"attn.{name}": getattr(tm, name).view(1, 1, C) for name in LERPS}
        sd |= {b + "attn.k_k": tm.k_k, b + "attn.k_a": tm.k_a, b + "attn.r_k": tm.r_k,
               b + "attn.g_norm.weight": tm.ln_x.weight, b + "attn.g_norm.bias": tm.ln_x.bias}
        for x in LORAS:
            lora = getattr(tm, f"{x}_lora")
            if lora is None:  # fla's layer 0 has no v_lora either
                continue
            sd |= {b + f"attn.{x}_lora.lora.0.weight": lora.down.T, b + f"attn.{x}_lora.lora.2.weight": lora.up.T}
            if lora.bias is not None:
                sd[b + f"attn.{x}_lora.lora.2.bias"] = lora.bias
        sd |= {b + f"attn.{fla}.weight": getattr(tm, ours).weight for ours, fla in FLA_PROJECTIONS.items()}
        sd |= {b + "ffn.x_k": block.mlp.x_k, b + "ffn.key.weight": block.mlp.key.weight,
               b + "ffn.value.weight": block.mlp.value.weight}
    sd |= {"model.norm.weight": student.norm.weight, "model.norm.bias": student.norm.bias,
           "lm_head.weight": student.lm_head.weight}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def fla_config(student: StudentLM, tokenizer: Any, max_positions: int | None, dtype: torch.dtype) -> dict[str, Any]:
    """fla's RWKV7Config as config.json (written without importing fla)."""
    cfg, shape = student.config, student.shape
    return {
        "model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "attn_mode": "chunk",
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers, "head_dim": cfg.head_size,
        "decay_low_rank_dim": cfg.w_lora, "a_low_rank_dim": cfg.a_lora, "v_low_rank_dim": cfg.v_lora,
        "gate_low_rank_dim": cfg.g_lora, "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True,
        "norm_eps": LAYER_NORM_EPS, "vocab_size": shape.vocab_size, "tie_word_embeddings": False,
        "max_position_embeddings": max_positions or 2048, "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "dtype": str(dtype).removeprefix("torch."),
    }


def write_rwkv(student: StudentLM, out: Path, dtype: torch.dtype) -> list[str]:
    """out/model.pth: load with rwkv.model.RWKV(model=str(out / "model"), strategy=...) (RWKV_V7_ON=1).
    A dict of tensors only, so torch.load(weights_only=True) reads it."""
    check_native(student, "rwkv")
    torch.save({k: v.to("cpu", dtype) for k, v in rwkv_state_dict(student).items()}, out / "model.pth")
    return ["model.pth"]


def write_fla(student: StudentLM, tokenizer: Any, out: Path, dtype: torch.dtype,
              max_positions: int | None) -> list[str]:
    """out/config.json + model.safetensors: AutoModelForCausalLM.from_pretrained(out) after `import fla`."""
    check_native(student, "fla")
    save_file({k: v.to("cpu", dtype) for k, v in fla_state_dict(student).items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(fla_config(student, tokenizer, max_positions, dtype), indent=2))
    return ["config.json", "model.safetensors"]
