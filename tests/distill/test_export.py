"""distill-export format=hf: the folder loads with transformers alone, in a process where the
project's packages are not importable, and computes what the training-time student computes."""

from __future__ import annotations

import dataclasses
import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.export import export
from models.student import StudentConfig, build_student
from models.teacher import load_teacher
from tests.distill.helpers import REPO, compose_train

LORAS = dict(w_lora=8, a_lora=8, v_lora=8, g_lora=8)
STUDENTS = {
    "rad_rwkv7": StudentConfig(**LORAS),
    "rwkv7": StudentConfig(time_mix="rwkv7", **LORAS),
    "rad_rwkv6": StudentConfig(time_mix="rad_rwkv6", **LORAS),
    "hybrid": StudentConfig(attention_layers=[1], **LORAS),
    "rwkv7_native": StudentConfig(time_mix="rwkv7", ffn="rwkv", norm="layer", **LORAS),
}
NEW_TOKENS = 100
SITE_PACKAGES = next(p for p in site.getsitepackages() if p.endswith("site-packages"))


def write_checkpoint(teacher_path: Path, cfg: StudentConfig, out: Path, seed: int = 0):
    """A distill-train-style checkpoint of a student whose new parameters are moved off their init
    (so every term shows in the outputs); returns (path, the fp32 student)."""
    teacher, _ = load_teacher(str(teacher_path))
    student = build_student(teacher, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
    record = {"teacher": {"_target_": "models.teacher.load_teacher", "path": str(teacher_path), "tokenizer": None},
              "student": dataclasses.asdict(cfg), "data": {}}
    torch.save({"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
                "distill": {"config": record, "stage_index": 1}}, out)
    return out, student.eval()


def export_cfg(tmp_path: Path, *overrides: str):
    return compose_train(list(overrides), tmp_path / "run", tmp_path / "cache", name="export")


def run_isolated(folders: list[Path], out: Path, **args) -> dict:
    """isolated_hf_check.py in `python -I -S` (no cwd, no PYTHONPATH, no .pth files: the project's
    editable install is invisible) with a fresh transformers module cache."""
    job = out.with_suffix(".job.json")
    job.write_text(json.dumps({"folders": [str(f) for f in folders], "out": str(out), "args": args}))
    env = {"HF_MODULES_CACHE": str(out.parent / "hf_modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-I", "-S", str(REPO / "tests/distill/isolated_hf_check.py"),
                             SITE_PACKAGES, str(job)], cwd=out.parent, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def exports(tiny_teacher, tmp_path_factory):
    """Every student type exported from a checkpoint, then run in one isolated process."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    made = {}
    for name, cfg in STUDENTS.items():
        ckpt, student = write_checkpoint(tiny_teacher, cfg, root / f"{name}.ckpt")
        export(export_cfg(root / name, f"ckpt={ckpt}", f"out={root / name / 'folder'}"))
        made[name] = (student, root / name / "folder")
    results = run_isolated([folder for _, folder in made.values()], root / "results.json",
                           ids=ids.tolist(), prompt="ROMEO:", new_tokens=NEW_TOKENS)
    return {name: (student, folder, results[str(folder)]) for name, (student, folder) in made.items()}, ids


def test_the_folder_holds_the_contract_files_and_nothing_to_unpickle(exports):
    made, _ = exports
    _, folder, _ = made["rad_rwkv7"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_rwkv_distill.py", "modeling_rwkv_distill.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "student.py", "kernels.py",
            "wkv7_triton.py"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv_distill.RWKVDistillForCausalLM"
    assert config["distill"]["teacher"]["path"] and config["distill"]["ckpt"].endswith("rad_rwkv7.ckpt")


@pytest.mark.parametrize("name", STUDENTS)
def test_isolated_logits_equal_the_training_time_student(exports, name):
    made, ids = exports
    student, _, result = made[name]
    assert result["module"].startswith("transformers_modules.")  # the folder's own code ran
    with torch.no_grad():
        want = student.logits(ids)
    got = torch.tensor(result["logits"])
    assert ((got - want).norm() / want.norm()).item() <= 1e-4


@pytest.mark.parametrize("name", STUDENTS)
def test_generate_equals_the_recurrent_loop_and_the_pipeline_agrees(exports, name):
    made, ids = exports
    student, _, result = made[name]
    assert result["generated"] == student.generate(ids[:1, :5], NEW_TOKENS)[0].tolist()
    assert result["pipeline"] == result["direct"] and len(result["direct"]) > 0


@pytest.mark.parametrize("name", STUDENTS)
def test_generation_memory_is_constant_in_rwkv_layers(exports, name):
    """State bytes after each generate() forward: the prompt (5 tokens), then one per token. RWKV
    layers hold the same bytes after 10 and after 100 tokens; kept attention grows by its K and V."""
    made, _ = exports
    student, _, result = made[name]
    steps = result["state_bytes"]
    assert len(steps) == NEW_TOKENS  # the prefill + NEW_TOKENS - 1 single-token forwards
    after_10, after_100 = steps[10 - 5], steps[-1]  # 10 and 5 + NEW_TOKENS - 1 = 104 tokens seen
    for layer in range(len(after_10)):
        if layer in student.config.attention_layers:
            kv_per_token = 2 * student.shape.num_kv_heads * student.shape.head_dim * 4
            assert after_100[layer] - after_10[layer] == (104 - 10) * kv_per_token
        else:
            assert after_100[layer] == after_10[layer] > 0
