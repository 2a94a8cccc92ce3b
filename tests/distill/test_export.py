"""distill-export format=hf: the folder loads with transformers alone, in a process where the
project's packages are not importable, and computes what the training-time student computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.export import export
from models.student import StudentConfig
from tests.distill.helpers import ASSETS, REPO, export_cfg, write_checkpoint

LORAS = dict(w_lora=8, a_lora=8, v_lora=8, g_lora=8)
STUDENTS = {
    "rad_rwkv7": StudentConfig(**LORAS),
    "rwkv7": StudentConfig(time_mix="rwkv7", **LORAS),
    "rad_rwkv6": StudentConfig(time_mix="rad_rwkv6", **LORAS),
    "hybrid": StudentConfig(attention_layers=[1], **LORAS),
    "rwkv7_native": StudentConfig(time_mix="rwkv7", ffn="rwkv", norm="layer", **LORAS),
}
NEW_TOKENS = 100
# where torch and transformers live (Debian's Pythons name it dist-packages); only these reach the child
SITE_PACKAGES = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
PASSED_ENV = ("PATH", "HOME", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR")


def run_isolated(folders: list[Path], out: Path, **args) -> dict:
    """isolated_hf_check.py in `python -I -S` (no cwd, no PYTHONPATH, no .pth files: the project's
    editable install is invisible; site-packages only) with a fresh transformers module cache."""
    job = out.with_suffix(".job.json")
    job.write_text(json.dumps({"folders": [str(f) for f in folders], "out": str(out), "args": args}))
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env |= {"HF_MODULES_CACHE": str(out.parent / "hf_modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-I", "-S", str(REPO / "tests/distill/isolated_hf_check.py"),
                             os.pathsep.join(SITE_PACKAGES), str(job)], cwd=out.parent, env=env, capture_output=True, text=True,
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


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.export", f"hydra.run.dir={cwd}/hydra", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_truncated_or_corrupted_checkpoint_is_one_clear_line(tiny_teacher, tmp_path):
    ckpt, _ = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], tmp_path / "a.ckpt")
    data = ckpt.read_bytes()
    for name, broken in (("truncated", data[: len(data) // 2]), ("corrupted", data[:100] + bytes(500) + data[600:])):
        (tmp_path / f"{name}.ckpt").write_bytes(broken)
        result = _cli(f"ckpt={tmp_path / name}.ckpt", f"out={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "truncated or corrupted" in errors[0]
        assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / name).exists()


def test_a_non_empty_out_is_kept_unless_overwrite(tiny_teacher, tmp_path):
    ckpt, student = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], tmp_path / "a.ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli(f"ckpt={ckpt}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 2 and "overwrite=true" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = _cli(f"ckpt={ckpt}", f"out={out}", "overwrite=true", "dtype=bf16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "keep.txt").exists() and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.slow
def test_a_zero_checkpoint_directory_exports(tiny_teacher, tmp_path):
    """A real ZeRO-2 directory (two gloo ranks) exports; the folder computes the consolidated student."""
    import torch.multiprocessing as mp

    from distill.restore import from_checkpoint, from_export
    from tests.distill.test_checkpoints import _free_port, _write_zero

    ckpt = tmp_path / "last.ckpt"
    mp.spawn(_write_zero, args=(2, _free_port(), 2, str(ckpt), str(tiny_teacher)), nprocs=2, join=True)
    assert ckpt.is_dir()
    export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}"))
    _, _, want, _ = from_checkpoint(ckpt)
    _, _, got, provenance = from_export(tmp_path / "out")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got.logits(ids), want.logits(ids), rtol=1e-6, atol=1e-6)
    assert provenance["ckpt"] == str(ckpt.resolve())


STORIES260K = ASSETS / "teachers" / "stories260K"


def test_a_llama2c_student_exports_with_a_hf_tokenizer_of_the_same_ids(tmp_path):
    if not (STORIES260K / "tok512.bin").is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS)")
    from transformers import AutoTokenizer

    from distill.restore import from_export
    from models.llama2c import Llama2cTokenizer

    ckpt, student = write_checkpoint(STORIES260K / "stories260K.bin", StudentConfig(head_size=16, **LORAS),
                                     tmp_path / "a.ckpt", tokenizer=STORIES260K / "tok512.bin")
    export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ours = Llama2cTokenizer(STORIES260K / "tok512.bin")
    stories = (ASSETS / "text" / "tinystories_valid_head45.txt").read_text().split("<|endoftext|>")
    texts = stories + ["", "héllo wörld 你好 <s> x", "  two  spaces\n\nnew line"]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [ours.encode(t) for t in texts]
    assert hf("Once upon").input_ids == ours.encode("Once upon", add_special_tokens=True)
    ids = ours.encode(stories[0], add_special_tokens=True)
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 2, 0, 512)
    _, _, exported, _ = from_export(tmp_path / "out")
    ids = torch.tensor([ids[:64]])
    with torch.no_grad():
        torch.testing.assert_close(exported.logits(ids), student.logits(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_on_cuda_the_folder_runs_our_triton_kernels(tiny_teacher, tmp_path):
    """The isolated folder on a GPU: its copy of kernels/ dispatches to the Triton WKV-7 kernels
    (head size 16 is one they serve) and the logits are the fp32 training-time student's."""
    ckpt, student = write_checkpoint(tiny_teacher, StudentConfig(head_size=16, **LORAS), tmp_path / "a.ckpt")
    export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'folder'}"))
    ids = torch.randint(0, 384, (2, 100), generator=torch.Generator().manual_seed(0))
    result = run_isolated([tmp_path / "folder"], tmp_path / "results.json", ids=ids.tolist(), prompt="ROMEO:",
                          new_tokens=20, device="cuda")[str(tmp_path / "folder")]
    assert any(name.endswith(".wkv7_triton") for name in result["triton_modules"]), result["triton_modules"]
    with torch.no_grad():
        want = student.logits(ids)
    got = torch.tensor(result["logits"])
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    assert result["generated"] == student.generate(ids[:1, :5], 20)[0].tolist()
