"""distill-export quantize=int8|int4: the folders load with transformers + torchao alone (no project
on the path, nothing unpickled), hold quantized linear weights, compute the student with those
weights (fp32 activations and state), and bad choices are clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from distill.export import export
from distill.quantize import GROUP_SIZE, check_quantize, weight_config
from tests.distill.helpers import export_cfg, make_tiny_teacher, write_checkpoint
from tests.distill.test_export import STUDENTS, run_isolated

KINDS = ("int8", "int4")
NEW_TOKENS = 20
# Relative logit error vs the fp32 student on the tiny random teacher (hidden size 32, so one int4
# group is a whole row). Measured 0.021 (int8) and 0.27 (int4); a folder of wrong or zeroed weights is ~1.
VS_FP32 = {"int8": 0.05, "int4": 0.5}


def dequantized(student: nn.Module, kind: str) -> nn.Module:
    """The student with each linear weight replaced by its quantize-dequantize round trip (torchao's
    own): what the quantized folder must compute, in fp32."""
    from torchao.quantization import quantize_

    ref = copy.deepcopy(student)
    for module in ref.modules():
        if isinstance(module, nn.Linear):
            quantize_(module, weight_config(kind, module.in_features, module is ref.lm_head))
            module.weight = nn.Parameter(module.weight.dequantize())
    return ref.eval()


@pytest.fixture(scope="module")
def folders(tiny_teacher, tmp_path_factory):
    """fp32, int8 and int4 exports of one checkpoint, each run in one isolated process."""
    root = tmp_path_factory.mktemp("quantized")
    ckpt, student = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], root / "a.ckpt")
    made = {}
    for kind in ("fp32", *KINDS):
        quantize = "null" if kind == "fp32" else kind
        export(export_cfg(root / kind, f"ckpt={ckpt}", f"out={root / kind / 'folder'}", f"quantize={quantize}"))
        made[kind] = root / kind / "folder"
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    results = run_isolated(list(made.values()), root / "results.json", ids=ids.tolist(), prompt="ROMEO:",
                           new_tokens=NEW_TOKENS)
    return student, ids, {kind: (folder, results[str(folder)]) for kind, folder in made.items()}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("kind", KINDS)
def test_the_folder_is_safetensors_and_code_only(folders, kind):
    _, _, made = folders
    folder, result = made[kind]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_rwkv_distill.py", "tokenizer.json"} <= names
    assert not [n for n in names if not n.endswith((".safetensors", ".json", ".py"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao" and config["distill"]["quantize"] == kind
    assert result["module"].startswith("transformers_modules.")  # loaded by the isolated check, torch.load refused


@pytest.mark.parametrize("kind", KINDS)
def test_every_linear_weight_is_quantized_and_the_rest_stays_fp32(folders, kind):
    student, _, made = folders
    folder, result = made[kind]
    linears = {f"student.{n}": m for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    want = "Int8Tensor" if kind == "int8" else "IntxUnpackedToInt8Tensor"
    head = "student.lm_head"
    assert result["linear_weights"] == {name: "Int8Tensor" if name == head else want for name in linears}
    stored = tensors(folder)
    for name, module in linears.items():
        qdata = stored[f"{name}._weight_qdata"]
        assert qdata.dtype == torch.int8 and qdata.shape == module.weight.shape
        scales = stored[f"{name}._weight_scale"].shape
        int8 = kind == "int8" or name == head  # int4 keeps lm_head at int8
        assert scales == ((module.out_features, 1) if int8 else (module.out_features, module.in_features // GROUP_SIZE))
        if not int8:
            assert -8 <= int(qdata.min()) and int(qdata.max()) <= 7
    others = {k: v for k, v in stored.items() if "._weight_" not in k}
    assert others and {v.dtype for v in others.values()} == {torch.float32}  # embedding, norms, LoRAs, mixes
    fp32_size = (made["fp32"][0] / "model.safetensors").stat().st_size
    linear_bytes = sum(m.weight.numel() * 4 for m in linears.values())
    # int8 values (1 byte, both kinds: torchao's serializable CPU int4 is unpacked) + small scales
    assert (folder / "model.safetensors").stat().st_size < fp32_size - 0.6 * linear_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_the_student_with_quantized_weights_and_the_state_stays_fp32(folders, kind):
    student, ids, made = folders
    _, result = made[kind]
    got = torch.tensor(result["logits"])
    with torch.no_grad():
        want = dequantized(student, kind).logits(ids)
        fp32 = student.logits(ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-4  # as test_export.py's fp32 folder
    error = ((got - fp32).norm() / fp32.norm()).item()
    assert 1e-3 < error <= VS_FP32[kind]  # changed by the quantization, but not garbage
    assert result["state_dtypes"] == ["torch.float32"] and made["fp32"][1]["state_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_runs_the_quantized_weights_from_the_state(folders, kind):
    student, ids, made = folders
    _, result = made[kind]
    assert len(result["generated"]) == 5 + NEW_TOKENS
    assert result["generated"] == dequantized(student, kind).generate(ids[:1, :5], NEW_TOKENS)[0].tolist()
    steps = result["state_bytes"]
    assert len(steps) == NEW_TOKENS and steps[0] == steps[-1]  # the fixed-size state, not a cache


def test_bad_choices_are_clear_errors(tiny_teacher, tmp_path):
    for fmt in ("fla", "rwkv", "onnx"):
        with pytest.raises(ValueError, match=f"quantize=int8 needs format=hf, not format={fmt}"):
            check_quantize("int8", fmt, "fp32")
    with pytest.raises(ValueError, match="quantize=int4 needs dtype=fp32, not dtype=bf16"):
        check_quantize("int4", "hf", "bf16")
    check_quantize(None, "rwkv", "bf16")  # the default: nothing to check
    ckpt, _ = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], tmp_path / "a.ckpt")
    for bad, message in (("quantize=int3", r"quantize='int3' is not one of \('int8', 'int4'\)"),
                         ("quantize=fp8", r"quantize='fp8' is not one of \('int8', 'int4'\)")):
        with pytest.raises(ValueError, match=message):
            export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}", bad))
        assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_on_cuda_the_fp32_folder_loads_with_bitsandbytes(folders, bits):
    """transformers' BitsAndBytesConfig path (distill.quantize.bnb_config): the projections and MLP
    become bitsandbytes layers, the state stays fp32, the logits stay near the fp32 student's."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from distill.quantize import bnb_config

    student, ids, made = folders
    model = AutoModelForCausalLM.from_pretrained(made["fp32"][0], trust_remote_code=True, dtype=torch.float32,
                                                 device_map="cuda", quantization_config=bnb_config(bits)).eval()
    layer = model.student.layers[0]
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(layer.time_mix.q_proj, kind) and isinstance(layer.mlp.down_proj, kind)
    ids = ids.cuda()
    with torch.no_grad():
        out = model(ids)
        fp32 = student.logits(ids.cpu())
    got = out.logits.float().cpu()
    assert 1e-3 < ((got - fp32).norm() / fp32.norm()).item() <= VS_FP32["int8" if bits == 8 else "int4"]
    assert {t.dtype for layer in out.recurrent_state.time_mix for t in layer.values()} == {torch.float32}
    generated = model.generate(ids[:1, :5], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, 5 + NEW_TOKENS)


def measured_as_dequantized(folder: Path, student: nn.Module, kind: str, ids: torch.Tensor) -> tuple[dict, nn.Module]:
    """distill-eval's measurement (from_export + compare_on_batches) of a quantized folder on ids [B, T];
    asserts its NLL is the dequantized student's. Returns (the measurement, the loaded student)."""
    from distill.evaluation import compare_on_batches
    from distill.restore import from_export
    from models.teacher import FrozenTeacher

    teacher, _, exported, _ = from_export(folder)
    batches = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
    got = compare_on_batches(FrozenTeacher(teacher), exported, batches)
    want = compare_on_batches(FrozenTeacher(teacher), dequantized(student, kind), batches)
    assert abs(got["student_nll"] - want["student_nll"]) <= 1e-5
    return got, exported


@pytest.mark.parametrize("kind", KINDS)
def test_distill_eval_measures_the_quantized_folder(folders, kind):
    """from_export + compare_on_batches (distill-eval, benchmarks/edge.py) on a quantized folder: the
    quantized lm_head goes into linear_kl dequantized; the NLL is the dequantized student's."""
    student, ids, made = folders
    got, _ = measured_as_dequantized(made[kind][0], student, kind, ids)
    assert got["eval_tokens"] == 2 * 23


def test_a_student_with_projection_biases_quantizes(tmp_path, corpus):
    """A Qwen teacher's q/k/v projections carry biases into the student: the weights are quantized,
    the biases stay fp32 (torchao refuses 1-d tensors; a 0.5B Qwen-shaped student once failed here)."""
    teacher_dir = make_tiny_teacher(tmp_path / "qwen2", corpus.read_text()[:100_000], model_type="qwen2")
    ckpt, student = write_checkpoint(teacher_dir, STUDENTS["rad_rwkv7"], tmp_path / "a.ckpt")
    assert student.layers[0].time_mix.v_proj.bias is not None
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        export(export_cfg(tmp_path / kind, f"ckpt={ckpt}", f"out={tmp_path / kind / 'folder'}", f"quantize={kind}"))
        _, exported = measured_as_dequantized(tmp_path / kind / "folder", student, kind, ids)
        bias = exported.layers[0].time_mix.v_proj.bias
        assert type(bias) is nn.Parameter and bias.dtype == torch.float32
