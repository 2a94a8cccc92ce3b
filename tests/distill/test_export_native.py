"""distill-export format=rwkv and format=fla: a plain RWKV-7 student (student=rwkv7_native) in
the native .pth layout, checked against the `rwkv` package's RWKV-7 inference, and in fla's
RWKV7ForCausalLM folder, checked against fla; other students get one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distill.export import export
from distill.export_native import write_fla
from models.student import StudentConfig, build_student
from tests.distill.test_export import LORAS, STUDENTS, export_cfg, write_checkpoint
from tests.models.test_student import make_teacher

TOKEN_IDS = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # all write_fla reads of a tokenizer
RWKV_CHECK = """
import json, sys, torch
from rwkv.model import RWKV
model = RWKV(model=sys.argv[1], strategy="cpu fp32")
ids = json.loads(sys.argv[2])
full, _ = model.forward(ids, None, full_output=True)
state, steps = None, []
for t in ids:
    out, state = model.forward([t], state)
    steps.append(out)
json.dump({"full": full.tolist(), "steps": torch.stack(steps).tolist()}, sys.stdout)
"""


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("jit", ["0", "1"])
def test_rwkv_pth_matches_the_rwkv_package(tiny_teacher, tmp_path, jit):
    """The `rwkv` package (RWKV_V7_ON=1, CPU fp32, its TorchScript path or plain Python) over the
    sequence at once and token by token: the training-time student's logits, rel <= 1e-5."""
    ckpt, student = write_checkpoint(tiny_teacher, STUDENTS["rwkv7_native"], tmp_path / "native.ckpt")
    result = export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}", "format=rwkv"))
    assert {"model.pth", "tokenizer.json"} <= set(result["files"])
    assert torch.load(tmp_path / "out" / "model.pth", weights_only=True)  # tensors only: nothing to unpickle
    ids = torch.randint(0, 384, (1, 20), generator=torch.Generator().manual_seed(0))
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": jit, "RWKV_CUDA_ON": "0"}
    run = subprocess.run([sys.executable, "-c", RWKV_CHECK, str(tmp_path / "out" / "model"), json.dumps(ids[0].tolist())],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = json.loads(run.stdout[run.stdout.index("{"):])
    with torch.no_grad():
        want = student.logits(ids)[0]
    assert rel(torch.tensor(outputs["full"]), want) <= 1e-5
    assert rel(torch.tensor(outputs["steps"]), want) <= 1e-5


def native_student(head_size: int = 64):
    """A native student of a teacher with head_dim 16 (64 wide), new parameters off their init."""
    teacher = make_teacher("llama", dtype=torch.float32, hidden_size=64, head_dim=16)
    student = build_student(teacher, StudentConfig(time_mix="rwkv7", ffn="rwkv", norm="layer", head_size=head_size,
                                                   **LORAS))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return student.eval()


def fla_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import fla  # noqa: F401  (registers model_type rwkv7 with the Auto classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(ids.device).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of fla runs under TRITON_INTERPRET; "
                                                     "on a GPU see test_fla_folder_matches_fla_on_gpu")
def test_fla_folder_matches_fla_on_cpu(tmp_path, monkeypatch):
    """fla on the CPU: its kernels under the Triton interpreter (fused recurrent path: T < 64, no
    grad). Triton's autotuner needs a GPU to time configs, so it is told they all take 0 ms."""
    pytest.importorskip("fla")
    import triton.runtime.autotuner as autotuner

    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config=None, **kw: [0.0, 0.0, 0.0])
    student = native_student()
    files = write_fla(student, TOKEN_IDS, tmp_path, torch.float32, 64)
    config = json.loads((tmp_path / "config.json").read_text())
    assert files == ["config.json", "model.safetensors"] and config["model_type"] == "rwkv7"
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student.logits(ids)
    assert rel(fla_logits(tmp_path, ids, torch.float32), want) <= 1e-5


@pytest.mark.gpu
def test_fla_folder_matches_fla_on_gpu(tmp_path):
    """fla's chunked kernels (T >= 64) on CUDA from a bf16 folder: the fp32 student's logits within
    bf16 tolerance (rel <= 2e-2)."""
    pytest.importorskip("fla")
    student = native_student().cuda()
    write_fla(student, TOKEN_IDS, tmp_path, torch.bfloat16, 512)
    ids = torch.randint(0, 61, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = student.logits(ids)
    assert rel(fla_logits(tmp_path, ids, torch.bfloat16), want) <= 2e-2


@pytest.mark.parametrize("name, fmt, named", [
    ("rad_rwkv7", "rwkv", ["RoPE", "GQA", "ffn='teacher'", "RMSNorm"]),
    ("rad_rwkv6", "fla", ["RWKV-6", "RMSNorm"]),
    ("hybrid", "rwkv", ["kept softmax attention in layers [1]"]),
    ("rwkv7_native", "fla", ["head_size=8", "head_size=64"]),
])
def test_a_student_the_format_cannot_hold_is_one_clear_error(tiny_teacher, tmp_path, name, fmt, named):
    ckpt, _ = write_checkpoint(tiny_teacher, STUDENTS[name], tmp_path / "a.ckpt")
    with pytest.raises(ValueError) as info:
        export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}", f"format={fmt}"))
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in named), message
    assert "student=rwkv7_native" in message and "format=hf" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
