"""distill-export format=onnx: the student's one-token recurrent step as an ONNX graph (torch.onnx),
for ONNX Runtime, plus an int8 variant (onnxruntime.quantization.quantize_dynamic).

    inputs:  input_ids [B, 1] int64; position [] int64, the token's absolute position (only when a
             time mix reads RoPE: rad_rwkv7); state.<field>.<layer>.<key> float32, e.g.
             state.time_mix.0.wkv [B, H, N, N], state.time_mix.0.shift [B, C], state.ffn.0.shift [B, C]
    outputs: logits [B, V] float32; new_state.<field>.<layer>.<key>, the state after the token

B is a dynamic axis. A fresh sequence starts at position 0 from the state in initial_state.safetensors
(zeros, except each layer's learned initial WKV state of a state-tuned student), broadcast over the
batch; a prompt goes in one token per call. Files: model.onnx (fp32), model.int8.onnx (MatMul/Gemm
weights int8, the state fp32), onnx.json (these names with their shapes and dtypes),
initial_state.safetensors ([1, ...] per state input name), the tokenizer files; students over 1 GiB of weights keep them beside the graphs
(model.onnx.data; that path is not exercised by the CPU tests). Shapes: B batch, V vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models.student import StudentLM, StudentState

FP32, INT8, INITIAL_STATE = "model.onnx", "model.int8.onnx", "initial_state.safetensors"
FIELDS = ("time_mix", "ffn")  # the StudentState lists that hold per-layer state dicts
OPSET = 18
EXTERNAL_DATA_BYTES = 2**30  # weights beyond this go to model.onnx.data: one protobuf holds at most 2 GiB


def check_fixed_state(student: StudentLM) -> None:
    """ValueError for a student whose state grows per token (kept softmax attention)."""
    kept = student.config.attention_layers
    if kept:
        raise ValueError(f"format=onnx exports a fixed-size recurrent step, but student.attention_layers={kept} "
                         "keep the teacher's softmax attention, whose KV cache grows with every token; export this "
                         "student with format=hf (distill-generate runs it from that folder)")


def uses_position(student: StudentLM) -> bool:
    return any(block.time_mix.uses_rope for block in student.layers)


@torch.no_grad()
def state_shapes(student: StudentLM) -> dict[str, list[int]]:
    """{"<field>.<layer>.<key>": shape without the batch axis} of the state after one token."""
    state = student(torch.zeros(1, 1, dtype=torch.long)).state
    return {f"{field}.{i}.{key}": list(t.shape[1:]) for field in FIELDS
            for i, layer in enumerate(getattr(state, field)) for key, t in layer.items()}


def initial_state(student: StudentLM, shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    """{"state.<name>": [1, ...]} a fresh sequence starts from: zeros, and the learned initial WKV
    state [H, N, N] where a time mix has one (state tuning; its state key is "wkv")."""
    fresh = {f"state.{n}": torch.zeros(1, *s) for n, s in shapes.items()}
    for i, block in enumerate(student.layers):
        learned = getattr(block.time_mix, "initial_state", None)
        if learned is not None:
            fresh[f"state.time_mix.{i}.wkv"] = learned.detach().float()[None].clone()
    return fresh


class RecurrentStep(nn.Module):
    """(input_ids [B, 1], [position [],] *state) -> (logits [B, V], *new state), the state tensors
    flat in the order of `names` ("<field>.<layer>.<key>"). Without with_position the position is
    0: no layer reads it."""

    def __init__(self, student: StudentLM, names: list[str], with_position: bool) -> None:
        super().__init__()
        self.student, self.names, self.with_position = student, names, with_position

    def forward(self, input_ids: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        position, flat = (inputs[0], inputs[1:]) if self.with_position else (0, inputs)
        layers = {field: [{} for _ in self.student.layers] for field in FIELDS}
        for name, t in zip(self.names, flat, strict=True):
            field, i, key = name.split(".")
            layers[field][int(i)][key] = t
        out = self.student(input_ids, StudentState(position, layers["time_mix"], layers["ffn"]))
        logits = self.student.lm_head(out.last_hidden[:, -1])  # [B, V]
        new = {field: getattr(out.state, field) for field in FIELDS}
        return (logits, *(new[field][int(i)][key] for field, i, key in (n.split(".") for n in self.names)))


def torch_path(student: StudentLM) -> StudentLM:
    """A copy whose WKV calls take the kernels' pure-PyTorch step (backend "torch"): Triton kernels
    cannot be traced into an ONNX graph, and backend "triton" under TRITON_INTERPRET=1 would pick them."""
    student = copy.deepcopy(student).float().eval()
    for block in student.layers:
        block.time_mix.backend = "torch"
    return student


def spec(student: StudentLM, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """onnx.json: every input and output with its shape ("batch" = the dynamic axis) and dtype."""
    state = [{"input": f"state.{n}", "output": f"new_state.{n}", "shape": ["batch", *s], "dtype": "float32"}
             for n, s in shapes.items()]
    inputs = [{"name": "input_ids", "shape": ["batch", 1], "dtype": "int64"}]
    if uses_position(student):
        inputs.append({"name": "position", "shape": [], "dtype": "int64"})
    return {
        "format": "distill onnx recurrent step", "opset": OPSET,
        "files": {"fp32": FP32, "int8": INT8, "initial_state": INITIAL_STATE},
        "inputs": inputs + [{"name": s["input"], "shape": s["shape"], "dtype": "float32"} for s in state],
        "outputs": [{"name": "logits", "shape": ["batch", student.shape.vocab_size], "dtype": "float32"}]
        + [{"name": s["output"], "shape": s["shape"], "dtype": "float32"} for s in state],
        "state": state, "vocab_size": student.shape.vocab_size,
        "state_bytes_per_sequence": sum(4 * torch.Size(s).numel() for s in shapes.values()),
    }


def external_data(student: StudentLM) -> bool:
    return sum(p.numel() * p.element_size() for p in student.parameters()) > EXTERNAL_DATA_BYTES


def export_step(student: StudentLM, shapes: dict[str, list[int]], path: Path) -> None:
    """torch.onnx (dynamo) export of RecurrentStep with a dynamic batch axis. Traced at B = 2:
    torch.export specializes a dimension of size 1."""
    names, with_position = list(shapes), uses_position(student)
    batch = torch.export.Dim("batch", min=1)
    args = [torch.zeros(2, 1, dtype=torch.long)] + [torch.zeros(2, *s) for s in shapes.values()]
    dynamic = [{0: batch} for _ in args]
    input_names = ["input_ids"] + [f"state.{n}" for n in names]
    if with_position:
        args.insert(1, torch.tensor(3))
        dynamic.insert(1, None)
        input_names.insert(1, "position")
    with torch.no_grad():
        program = torch.onnx.export(RecurrentStep(student, names, with_position).eval(), tuple(args), dynamo=True,
                                    dynamic_shapes=(dynamic[0], tuple(dynamic[1:])),  # forward(input_ids, *inputs)
                                    input_names=input_names,
                                    output_names=["logits"] + [f"new_state.{n}" for n in names],
                                    opset_version=OPSET, external_data=external_data(student), verbose=False)
    program.save(str(path))


def quantize_int8(fp32: Path, out: Path, external: bool) -> None:
    """Weight-only int8 (dynamic activation quantization) of the MatMul/Gemm weights, ONNX Runtime's quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=external)


def write_onnx(student: StudentLM, out: Path) -> list[str]:
    """model.onnx, model.int8.onnx, initial_state.safetensors and onnx.json into out; returns their names."""
    check_fixed_state(student)
    student = torch_path(student)
    shapes = state_shapes(student)
    logging.disable(logging.INFO)  # the exporter's and quantizer's per-node INFO lines (Hydra logs INFO)
    try:
        export_step(student, shapes, out / FP32)
        quantize_int8(out / FP32, out / INT8, external_data(student))
    finally:
        logging.disable(logging.NOTSET)
    save_file(initial_state(student, shapes), out / INITIAL_STATE)
    (out / "onnx.json").write_text(json.dumps(spec(student, shapes), indent=2))
    return sorted(p.name for p in out.iterdir())
