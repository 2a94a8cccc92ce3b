"""LoRA stages (distill/lora.py): only the adapters (and the stage's named group) train, the merge
is exact, a bad spec is one clear error, and the real entry point runs, resumes and exports a
LoRA stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.checkpoints import read_checkpoint
from distill.export import export
from distill.lora import Adapters, LoraSpec, load_student
from distill.module import DistillModule
from distill.restore import from_checkpoint
from distill.stages import Stage, check_fits, stages_from_config
from distill.train import train
from models.student import StudentConfig, build_student
from tests.distill.helpers import compose_train, export_cfg, job_overrides, run_job, staged_module
from tests.models.test_student import make_teacher

LORAS = dict(w_lora=8, a_lora=8, v_lora=8, g_lora=8)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_stage(trainable: str = "none", **lora) -> Stage:
    return Stage(name="kl", loss="kl", tokens=64, seq_len=8, batch_size=2, lr=1e-3, trainable=trainable,
                 lora={"r": 4, "alpha": 8.0, **lora})


def module_with(stage: Stage, student_cfg: StudentConfig = StudentConfig(**LORAS)):
    return staged_module(student_cfg, stage, total_steps=4)


def grads_after_one_step(module: DistillModule, student) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient after one backward of the stage's loss (None: no gradient)."""
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    module.stage_loss(ids[:, :-1], ids[:, 1:])["loss"].backward()
    return {name: p.grad for name, p in student.named_parameters()}


def adapter_count(student, targets: list[str], r: int) -> int:
    """r * (in + out) for every Linear whose leaf name is a target: A is [r, in], B [out, r]."""
    return sum(r * (m.in_features + m.out_features) for name, m in student.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def test_a_lora_stage_with_trainable_none_gives_gradients_to_the_adapters_only():
    stage = lora_stage(target_modules=ATTENTION)
    plain = build_student(make_teacher(dtype=torch.float32), StudentConfig(**LORAS))
    want = adapter_count(plain, ATTENTION, r=4)  # 2 layers x 4 x (64 + 48 + 48 + 64) = 1792
    module, student = module_with(stage)
    grads = grads_after_one_step(module, student)
    with_grad = {n for n, g in grads.items() if g is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert sum(dict(student.named_parameters())[n].numel() for n in with_grad) == want == 1792
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == want
    assert all(grads[n].abs().sum() > 0 for n in with_grad if ".lora_B." in n)  # B gets a signal at once (A != 0)


def test_trainable_names_the_group_that_trains_in_full_beside_the_adapters():
    """trainable=time_mix with LoRA on q/k/v/o: the adapters and every other time-mix parameter
    train; the wrapped projections' own weights and everything outside the time mixes do not."""
    module, student = module_with(lora_stage(trainable="time_mix", target_modules=ATTENTION))
    grads = grads_after_one_step(module, student)
    with_grad = {n for n, g in grads.items() if g is not None}
    assert not [n for n in with_grad if ".base_layer." in n or ".time_mix." not in n]
    new = {n for n in with_grad if ".lora_" not in n}
    assert {n.split(".time_mix.")[1] for n in new} >= {"w_lora.bias", "a_lora.down", "k_k", "k_a"}
    adapters = sum(p.numel() for n, p in student.named_parameters() if n in with_grad and ".lora_" in n)
    assert adapters == 1792


@pytest.mark.parametrize("targets", [ATTENTION, ["gate_proj", "up_proj", "down_proj", "lm_head"]],
                         ids=["attention", "mlp+head"])
def test_merged_student_equals_the_unmerged_one(targets):
    """peft's merge folds alpha/r B A into each weight: the same logits (fp32) as the adapters beside it,
    and different from the student without them; load_student of a mid-stage checkpoint merges too."""
    teacher = make_teacher(dtype=torch.float32)
    student = build_student(teacher, StudentConfig(**LORAS))
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = student.logits(ids)
    adapters = Adapters(student, LoraSpec(r=4, alpha=8.0, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.3)
        unmerged = student.logits(ids)
    checkpoint = {"state_dict": {f"student.{k}": v.clone() for k, v in student.state_dict().items()},
                  "distill": {"lora": adapters.spec.record()}}
    adapters.merge()
    assert not [k for k in student.state_dict() if "lora_" in k or "base_layer" in k]
    with torch.no_grad():
        merged = student.logits(ids)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() <= 1e-6
    assert ((unmerged - base).norm() / base.norm()).item() >= 1e-2
    restored = build_student(teacher, StudentConfig(**LORAS))
    load_student(restored, checkpoint)
    with torch.no_grad():
        assert ((restored.logits(ids) - unmerged).norm() / unmerged.norm()).item() <= 1e-6


def test_adapters_under_compile_and_activation_checkpointing_match_eager():
    """The GPU presets' runtime (parallel.prepare_student: activation checkpointing, then torch.compile
    per block; aot_eager here) with adapters injected afterwards, as set_stage does, and learned initial
    states: the same outputs and gradients as eager, and the merge leaves the same plain keys."""
    from distill import parallel

    torch._dynamo.reset()
    teacher = make_teacher(dtype=torch.float32)
    cfg = StudentConfig(learned_initial_state=True, **LORAS)
    eager = build_student(teacher, cfg)
    wrapped = build_student(teacher, cfg)
    wrapped.load_state_dict(eager.state_dict())  # the same new weights (their init is random)
    parallel.prepare_student(wrapped, {"compile": True, "compile_backend": "aot_eager",
                                       "activation_checkpointing": True, "tf32": False})
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs, adapters = [], []
    for model in (eager, wrapped):
        torch.manual_seed(0)
        adapters.append(Adapters(model, LoraSpec(r=4, target_modules=[*ATTENTION, "gate_proj"])))
        with torch.no_grad():
            for p in [*adapters[-1].parameters(), *model.initial_state_parameters()]:
                p.normal_(0, 0.3)
        out = model.logits(ids)
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(adapters[0].parameters(), adapters[1].parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(eager.initial_state_parameters(), wrapped.initial_state_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    for a in adapters:
        a.merge()
    assert set(wrapped.state_dict()) == set(eager.state_dict()) == set(build_student(teacher, cfg).state_dict())
    with torch.no_grad():  # W + alpha/r B A rounds differently from the two products apart
        assert ((wrapped.logits(ids) - outputs[0]).norm() / outputs[0].norm()).item() <= 1e-6


@pytest.mark.parametrize("lora, trainable, message", [
    ({"r": 0}, "none", "lora.r=0 must be a positive integer"),
    ({"r": 2.5}, "none", "lora.r=2.5 must be a positive integer"),
    ({"alpha": -1}, "none", "lora.alpha=-1 must be > 0"),
    ({"dropout": 1.0}, "none", "lora.dropout=1.0 must lie in [0, 1)"),
    ({"target_modules": []}, "none", "lora.target_modules is empty"),
    ({"target_modules": "q_proj"}, "none", "must be a list of module names"),
    ({"rank": 8}, "none", "lora has unknown keys ['rank']"),
    ({"r": 8}, "all", "trainable=all trains every weight too; set trainable: none"),
    (None, "none", "trainable=none trains nothing without lora"),
])
def test_a_bad_lora_entry_is_one_clear_error_naming_the_stage(lora, trainable, message):
    entry = {"name": "kl", "loss": "kl", "tokens": 64, "seq_len": 8, "batch_size": 2, "lr": 1e-3,
             "trainable": trainable, "lora": lora}
    with pytest.raises(ValueError, match="stage 'kl': ") as err:
        stages_from_config([entry])
    assert message in str(err.value)


def test_lora_on_the_head_is_refused_in_a_distillation_stage():
    """The fused KL takes lm_head's weight, not its output: an adapter there would stay at zero."""
    student = build_student(make_teacher(dtype=torch.float32), StudentConfig(**LORAS))
    with pytest.raises(ValueError, match="stage 'kl': lora.target_modules names lm_head.*leave lm_head out"):
        check_fits(lora_stage(target_modules=["q_proj", "lm_head"]), student)


@pytest.mark.parametrize("target, why", [("w_lora", "is not an nn.Linear layer"), ("qkv", "matches no module")])
def test_a_target_the_student_has_not_is_named_with_the_valid_ones(target, why):
    student = build_student(make_teacher(dtype=torch.float32), StudentConfig(**LORAS))
    with pytest.raises(ValueError) as err:
        check_fits(lora_stage(target_modules=[target]), student)
    assert f"stage 'kl': lora.target_modules: {target!r} {why}" in str(err.value)
    assert "'q_proj'" in str(err.value) and "'gate_proj'" in str(err.value)


# ----- the real entry point ---------------------------------------------------------------------------

STEPS = 6
LORA_KL = ["stages=radlads_small", "stages.2.seq_len=32", "stages.2.batch_size=4", "stages.2.lr=1e-3",
           "+stages.1.lora={r: 4, alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj]}",
           "stages.1.trainable=none", "stages.1.lr=1e-2"]


def lora_job(teacher: Path, text: Path, cache: Path, *extra: str) -> list[str]:
    """align, kl with LoRA (adapters only), finetune without: 6 steps each, last.ckpt every 3."""
    return [*job_overrides(teacher, text, cache, steps=STEPS, every=3), *LORA_KL, *extra]


@pytest.fixture(scope="module")
def lora_runs(stdlib_teacher, corpus, tmp_path_factory):
    """The job once through (train(), in this process), and through python -m distill.train killed
    inside step 4 of the LoRA stage (after last.ckpt of step 3), its checkpoint kept aside, then
    resumed with ckpt_path=last."""
    root = tmp_path_factory.mktemp("lora_runs")
    train(compose_train(lora_job(stdlib_teacher, corpus, root / "cache"), root / "full", root / "cache"))
    kill = ["+callbacks.interrupt._target_=tests.distill.interrupts.Interrupt", "+callbacks.interrupt.stage=kl",
            "+callbacks.interrupt.step=4", "+callbacks.interrupt.moment=step"]
    killed = run_job(root / "resumed", lora_job(stdlib_teacher, corpus, root / "cache", *kill))
    assert killed.returncode != 0
    mid = root / "mid-lora.ckpt"
    mid.write_bytes((root / "resumed" / "checkpoints" / "last.ckpt").read_bytes())
    resumed = run_job(root / "resumed", lora_job(stdlib_teacher, corpus, root / "cache", "ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, mid


@pytest.mark.slow  # the lora_runs fixture: three short jobs, two of them subprocesses (~30 s)
def test_lora_stage_checkpoints_hold_the_adapters_and_later_stages_plain_weights(lora_runs):
    root, mid = lora_runs
    checkpoints = root / "full" / "checkpoints"
    records = {name: read_checkpoint(checkpoints / f"{name}.ckpt")
               for name in ("stage0-align", "stage1-kl", "stage2-finetune")}
    assert [r["distill"]["lora"] is None for r in records.values()] == [True, False, True]
    assert records["stage1-kl"]["distill"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]}
    wrapped = [k for k in records["stage1-kl"]["state_dict"] if ".lora_A." in k]
    assert len(wrapped) == 2 * 5  # 2 layers x 5 targets
    assert not [k for k in records["stage2-finetune"]["state_dict"] if "lora_" in k or "base_layer" in k]
    mid_record = read_checkpoint(mid)["distill"]
    assert (mid_record["stage_name"], mid_record["lora"]["r"]) == ("kl", 4)
    # the base weights did not move during the LoRA stage: only the adapters did
    align, kl = records["stage0-align"]["state_dict"], records["stage1-kl"]["state_dict"]
    for key in ("student.layers.0.time_mix.q_proj.weight", "student.layers.1.mlp.gate_proj.weight"):
        assert torch.equal(kl[key.replace(".weight", ".base_layer.weight")], align[key])
    assert torch.equal(kl["student.layers.0.time_mix.w_lora.bias"], align["student.layers.0.time_mix.w_lora.bias"])


@pytest.mark.slow
def test_resume_in_the_lora_stage_matches_the_uninterrupted_run(lora_runs):
    root, _ = lora_runs
    full, resumed = (json.loads((root / name / "summary.json").read_text()) for name in ("full", "resumed"))
    assert [s["name"] for s in resumed["stages"]] == ["align", "kl", "finetune"]
    for a, b in zip(full["stages"], resumed["stages"], strict=True):
        assert (a["steps"], a["tokens"]) == (b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(full["student_ppl"], rel=1e-5)


@pytest.mark.slow
def test_a_mid_lora_stage_checkpoint_loads_merged_for_export_and_eval(lora_runs, tmp_path, monkeypatch):
    """distill-export / distill-eval read through restore.from_checkpoint: the adapters come back
    merged into plain weights, computing what the student with its adapters computed."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    _, mid = lora_runs
    teacher, _, student, run = from_checkpoint(mid)
    assert not [k for k in student.state_dict() if "lora_" in k or "base_layer" in k]
    unmerged = build_student(teacher, StudentConfig(**run["student"]))
    Adapters(unmerged, LoraSpec.of(read_checkpoint(mid)["distill"]["lora"]))
    unmerged.load_state_dict({k.removeprefix("student."): v for k, v in read_checkpoint(mid)["state_dict"].items()})
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = unmerged.eval().logits(ids)
        assert ((student.logits(ids) - want).norm() / want.norm()).item() <= 1e-6
    folder = tmp_path / "folder"
    export(export_cfg(tmp_path, f"ckpt={mid}", f"out={folder}"))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
