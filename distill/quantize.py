"""distill-export quantize=int8|int4: weight-only quantization of the HF folder for CPU inference.

transformers' own torchao path does the work: the fp32 folder is loaded with a TorchAoConfig
(transformers quantizes each nn.Linear weight as it loads) and saved again. transformers flattens
torchao's tensor subclasses into plain safetensors tensors (qdata, scale, zero_point) with a JSON
description in the file's metadata, and rebuilds them from that on load: nothing is pickled. The
folder loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` wherever
torchao is installed (config.json's quantization_config names it).

    int8: Int8WeightOnlyConfig, one scale per output row (symmetric).
    int4: IntxWeightOnlyConfig(int4), one scale per group of GROUP_SIZE inputs (per row where the
          group does not divide the row); lm_head int8, as llama.cpp's 4-bit types keep the output
          matrix at 6 bits: its error reaches every logit directly (with lm_head at int4 too, the
          stories260K student missed the +5% NLL target: BENCHMARKS.md, "Quantized students"). torchao's CPU int4
          layout that safetensors can hold (IntxUnpackedToInt8Tensor) keeps one 4-bit value per byte:
          the folder is int8-sized on disk; the packed CPU layouts are not serializable in torchao 0.18.

What is quantized: every nn.Linear - the teacher's projections (q/k/v/o), the MLP (or the RWKV
channel mix) and lm_head (int8 in both kinds). These hold nearly all the weights (lm_head alone is V x C, untied in the
student). What stays fp32: the embedding (a lookup, no matmul to save), the norms, and the RWKV
pieces that are plain parameters - the decay/in-context-rate/value/gate LoRAs (rank 8-64, a small
share of the bytes, feeding exp(-exp(w)) where an error in w compounds along the sequence), the
token-shift mixes and k_k/k_a. Activations stay fp32 (weight-only: torchao dequantizes to the
input's dtype), so the recurrent state and the WKV math stay fp32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import BitsAndBytesConfig, TorchAoConfig

from models.hf_config import RWKVDistillConfig
from models.hf_model import RWKVDistillForCausalLM

QUANTIZE = ("int8", "int4")
FORMATS = ("hf",)  # format=onnx has its own int8 (ONNX Runtime's quantizer); fla/rwkv are other runtimes' files
GROUP_SIZE = 32  # int4 inputs per scale: llama.cpp's Q4_0 block; divides every hidden size we distill


def check_quantize(quantize: str | None, fmt: str, dtype: str) -> None:
    """ValueError naming the bad value unless quantize is None or a kind this format and dtype take."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE} (or null: no quantization)")
    if fmt not in FORMATS:
        raise ValueError(f"quantize={quantize} needs format=hf, not format={fmt}"
                         + (" (format=onnx has its own int8 variant)" if fmt == "onnx" else ""))
    if dtype != "fp32":
        raise ValueError(f"quantize={quantize} needs dtype=fp32, not dtype={dtype}: the weights are quantized "
                         "from fp32 and the activations, the recurrent state and the WKV math stay fp32")


def weight_config(quantize: str, in_features: int, head: bool = False):
    """torchao's config for one linear weight [out, in_features]; head: it is lm_head."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, PerGroup

    if quantize == "int8" or head:  # int4 too keeps lm_head at int8 (see the docstring)
        return Int8WeightOnlyConfig()
    # a group must divide the row (stories260K's MLP down_proj has 172 inputs): else one scale per row
    groups = PerGroup(GROUP_SIZE) if in_features % GROUP_SIZE == 0 else PerAxis(0)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=groups)


def torchao_config(folder: Path, quantize: str) -> TorchAoConfig:
    """Every nn.Linear of the folder's model by name (see the docstring for why these), lm_head included."""
    from torchao.quantization import FqnToConfig

    with torch.device("meta"):  # the shapes only
        model = RWKVDistillForCausalLM(RWKVDistillConfig.from_pretrained(folder))
    head = model.get_output_embeddings()
    # keyed by the weight's name, not the module's: a module key also sends the module's bias (Qwen's
    # q/k/v projections have one) to torchao, which refuses 1-d tensors
    linears = {f"{name}.weight": weight_config(quantize, module.in_features, module is head)
               for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return TorchAoConfig(quant_type=FqnToConfig(linears), modules_to_not_convert=[])


def write_quantized(fp32: Path, out: Path, quantize: str) -> list[str]:
    """The fp32 HF folder `fp32` with its linear weights quantized, written into out (existing,
    empty): transformers writes the weights and config.json, the code and tokenizer files are copied."""
    model = RWKVDistillForCausalLM.from_pretrained(fp32, quantization_config=torchao_config(fp32, quantize))
    model.save_pretrained(out)
    for path in fp32.iterdir():
        if not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    return sorted(p.name for p in out.iterdir())


def bnb_config(bits: int) -> BitsAndBytesConfig:
    """On a CUDA GPU the fp32 folder (no quantize=) loads quantized by bitsandbytes as it loads:
        AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, device_map="cuda",
                                             dtype=torch.float32, quantization_config=bnb_config(8))
    dtype=float32 keeps what is not quantized (embedding, norms, LoRAs: hence the recurrent state and
    the WKV math) in fp32, as 4-bit's compute dtype does; bitsandbytes leaves lm_head in fp32 by default."""
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raise ValueError(f"bits={bits} is not one of (8, 4) (bitsandbytes' LLM.int8() and NF4)")
