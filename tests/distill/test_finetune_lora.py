"""LoRA after conversion (distill/finetune_lora.py): an exported student fine-tunes with peft and the
transformers Trainer on a text file; the loss falls, the adapters are saved as safetensors, and the
merged folder loads with transformers alone and computes what the unmerged model computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from distill.export import export
from distill.finetune_lora import main
from tests.distill.helpers import REPO
from tests.distill.test_export import STUDENTS, export_cfg, run_isolated, write_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def finetuned(tiny_teacher, shakespeare, tmp_path_factory):
    """`python -m distill.finetune_lora` on a 2-layer export: 20 steps of r=4 adapters on 8 kinds of Linear."""
    root = tmp_path_factory.mktemp("finetune_lora")
    ckpt, _ = write_checkpoint(tiny_teacher, STUDENTS["rad_rwkv7"], root / "a.ckpt")
    export(export_cfg(root, f"ckpt={ckpt}", f"out={root / 'folder'}"))
    (root / "text.txt").write_text(shakespeare.read_text()[:20_000])
    result = subprocess.run(
        [sys.executable, "-m", "distill.finetune_lora", str(root / "folder"), "--text", str(root / "text.txt"),
         "--out", str(root / "out"), "--steps", "20", "--seq-len", "32", "--batch-size", "8", "--lr", "1e-2",
         "--r", "4", "--target-modules", *TARGETS],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(root / "hf_modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_the_loss_falls(finetuned):
    losses = json.loads((finetuned / "out" / "losses.json").read_text())
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, losses  # from ~ln(384) = 5.95 nats: a random student's uniform guess


def test_the_adapters_are_safetensors_of_lora_matrices_only(finetuned):
    adapter = finetuned / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 16.0, sorted(TARGETS))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * (2 * 7 + 1)  # A and B of 7 Linears in each of 2 layers, and of lm_head
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_the_merged_folder_computes_what_the_unmerged_model_does(finetuned, monkeypatch):
    """The merged folder in a process without the project (transformers alone) vs the exported
    folder with the saved adapters put back by peft, unmerged (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = finetuned / "out" / "merged"
    assert not [p.name for p in merged.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    got = torch.tensor(run_isolated([merged], finetuned / "results.json", ids=ids.tolist(), prompt="ROMEO:",
                                    new_tokens=8)[str(merged)]["logits"])
    monkeypatch.setenv("HF_MODULES_CACHE", str(finetuned / "hf_modules_here"))
    base = AutoModelForCausalLM.from_pretrained(finetuned / "folder", trust_remote_code=True).eval()
    with torch.no_grad():
        before = base(ids, use_cache=False).logits
        unmerged = PeftModel.from_pretrained(base, finetuned / "out" / "adapter").eval()
        want = unmerged(input_ids=ids, use_cache=False).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert ((want - before).norm() / before.norm()).item() >= 1e-2


def test_a_target_the_model_has_not_is_one_clear_error(finetuned, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    with pytest.raises(SystemExit) as exit_:
        main([str(finetuned / "folder"), "--text", str(finetuned / "text.txt"), "--out", str(tmp_path / "out"),
              "--target-modules", "w_lora"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: lora.target_modules: 'w_lora' is not an nn.Linear layer" in err and "'q_proj'" in err


def test_a_folder_that_is_no_export_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"error: {str(tmp_path)!r} is not a distill-export format=hf folder" in capsys.readouterr().err
