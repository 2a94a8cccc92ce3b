"""State tuning (`trainable: state`, student.learned_initial_state=true): only each RWKV layer's
initial WKV state learns, it lowers the loss on a task a state can hold, and the checkpoint and the
HF export carry it (the exported model starts from it); the native formats refuse it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.checkpoints import read_checkpoint
from distill.export import export
from distill.restore import from_checkpoint
from distill.stages import Stage, check_fits
from distill.train import train
from models.student import StudentConfig, build_student
from tests.distill.helpers import compose_tiny_job, export_cfg, staged_module, write_checkpoint
from tests.distill.test_export import run_isolated
from tests.models.test_student import make_teacher

LORAS = dict(w_lora=8, a_lora=8, v_lora=8, g_lora=8)
STATE = StudentConfig(learned_initial_state=True, **LORAS)


def state_stage(lr: float = 1e-3) -> Stage:
    """Language-model training on the labels alone (no teacher signal), initial states only."""
    return Stage(name="state", loss="kl", tokens=64, seq_len=8, batch_size=2, lr=lr, trainable="state",
                 kl_weight=0.0, ce_weight=1.0, warmup_fraction=0.0, min_lr_ratio=1.0)


def state_module(cfg: StudentConfig, stage: Stage):
    return staged_module(cfg, stage, total_steps=100)


@pytest.mark.parametrize("cfg, rwkv_layers", [
    (StudentConfig(**LORAS), 2), (StudentConfig(time_mix="rwkv7", **LORAS), 2),
    (StudentConfig(time_mix="rad_rwkv6", **LORAS), 2), (StudentConfig(attention_layers=[1], **LORAS), 1),
], ids=["rad_rwkv7", "rwkv7", "rad_rwkv6", "hybrid"])
def test_trainable_state_gives_gradients_to_the_initial_states_only(cfg, rwkv_layers):
    """One [H, N, N] = [4, 8, 8] state per RWKV layer; kept attention has none."""
    module, student = state_module(dataclasses.replace(cfg, learned_initial_state=True), state_stage())
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    module.stage_loss(ids[:, :-1], ids[:, 1:])["loss"].backward()
    with_grad = {n: p for n, p in student.named_parameters() if p.grad is not None}
    assert sorted(with_grad) == [f"layers.{i}.time_mix.initial_state" for i in range(rwkv_layers)]
    assert sum(p.numel() for p in with_grad.values()) == rwkv_layers * 4 * 8 * 8
    assert all(p.grad.abs().sum() > 0 for p in with_grad.values())


def test_a_zero_initial_state_computes_what_the_student_without_one_does():
    teacher = make_teacher(dtype=torch.float32)
    plain, learned = build_student(teacher, StudentConfig(**LORAS)), build_student(teacher, STATE)
    learned.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(learned.logits(ids), plain.logits(ids))


@pytest.mark.parametrize("time_mix", ["rad_rwkv7", "rwkv7", "rad_rwkv6"])
def test_a_learned_state_is_where_every_path_starts(time_mix):
    """Token by token from a fresh one-token forward (the step kernels) equals one parallel forward
    (the chunked kernels), both from the learned state, which changes the outputs."""
    teacher = make_teacher(dtype=torch.float32)
    student = build_student(teacher, StudentConfig(time_mix=time_mix, learned_initial_state=True, **LORAS)).eval()
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        zeros = student.logits(ids)
        for p in student.initial_state_parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        full = student.logits(ids)
        out, steps = None, []
        for t in range(ids.shape[1]):
            out = student(ids[:, t:t + 1], None if out is None else out.state)
            steps.append(student.lm_head(out.last_hidden))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert ((full - zeros).norm() / zeros.norm()).item() >= 1e-2


def test_trainable_state_on_a_student_without_it_names_the_override():
    student = build_student(make_teacher(dtype=torch.float32), StudentConfig(**LORAS))
    with pytest.raises(ValueError) as err:
        check_fits(state_stage(), student)
    assert "stage 'state': trainable=state" in str(err.value)
    assert "student.learned_initial_state=true" in str(err.value)


def prefix_ce(student, ids: torch.Tensor, prefix: int) -> float:
    """Mean next-token cross-entropy over the first `prefix` - 1 predictions of ids [B, T]."""
    with torch.no_grad():
        logits = student.logits(ids[:, :prefix])  # [B, P, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:prefix].flatten()).item()


def test_state_tuning_absorbs_a_fixed_opening():
    """Every sequence opens with the same 6 tokens, then random ones: the initial state learns to
    predict the opening (as a prompt would), at no cost per token. The CE over the opening falls
    4.27 -> 2.85 nats in 100 steps here; the random tiny student's GroupNorm'd heads bound how far."""
    module, student = state_module(STATE, state_stage(lr=5e-2))
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 61, (6,), generator=g)
    batch = lambda: torch.cat((prefix.expand(8, -1), torch.randint(0, 61, (8, 10), generator=g)), dim=1)  # noqa: E731
    held_out = batch()
    before = prefix_ce(student, held_out, 6)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(100):
        ids = batch()
        optimizer.zero_grad()
        module.stage_loss(ids[:, :-1], ids[:, 1:])["loss"].backward()
        optimizer.step()
    after = prefix_ce(student, held_out, 6)
    assert after < 0.75 * before, (before, after)


@pytest.fixture(scope="module")
def state_job(tiny_teacher, tmp_path_factory):
    """distill-train with student.learned_initial_state=true and a kl stage that tunes the state only
    (CE on the text beside the KL), then distill-export of its last checkpoint."""
    root = tmp_path_factory.mktemp("state_job")
    cfg = compose_tiny_job(tiny_teacher, root / "run", root / "cache", steps=6, extra=[
        "student.learned_initial_state=true", "stages.1.trainable=state", "stages.1.lr=3e-2",
        "stages.1.ce_weight=1.0"])
    train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    export(export_cfg(root, f"ckpt={checkpoints / 'stage1-kl.ckpt'}", f"out={root / 'folder'}"))
    return checkpoints, root / "folder"


def test_the_state_stage_moves_the_initial_states_and_nothing_else(state_job):
    checkpoints, _ = state_job
    align, kl = (read_checkpoint(checkpoints / f"{n}.ckpt")["state_dict"] for n in ("stage0-align", "stage1-kl"))
    states = [k for k in kl if k.endswith("initial_state")]
    assert states == ["student.layers.0.time_mix.initial_state", "student.layers.1.time_mix.initial_state"]
    assert all(tuple(kl[k].shape) == (4, 8, 8) and not torch.equal(kl[k], align[k]) for k in states)
    assert [k for k in kl if not torch.equal(kl[k], align[k])] == states


def test_the_export_starts_from_the_learned_state(state_job):
    """In a process without the project: the folder's logits and greedy generation are the trained
    student's, and differ from the same student started from zeros."""
    checkpoints, folder = state_job
    _, _, student, _ = from_checkpoint(checkpoints / "stage1-kl.ckpt")
    zero = copy.deepcopy(student)
    with torch.no_grad():
        for p in zero.initial_state_parameters():
            p.zero_()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    result = run_isolated([folder], folder.parent / "results.json", ids=ids.tolist(), prompt="ROMEO:",
                          new_tokens=20)[str(folder)]
    got = torch.tensor(result["logits"])
    with torch.no_grad():
        want, zeros = student.logits(ids), zero.logits(ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert ((got - zeros).norm() / zeros.norm()).item() >= 1e-3
    assert result["generated"] == student.generate(ids[:1, :5], 20)[0].tolist()


@pytest.mark.parametrize("fmt", ["rwkv", "fla"])
def test_the_native_formats_refuse_a_learned_initial_state(tiny_teacher, tmp_path, fmt):
    native = StudentConfig(time_mix="rwkv7", ffn="rwkv", norm="layer", learned_initial_state=True, **LORAS)
    ckpt, _ = write_checkpoint(tiny_teacher, native, tmp_path / "a.ckpt")
    with pytest.raises(ValueError) as err:
        export(export_cfg(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'out'}", f"format={fmt}"))
    assert "learned_initial_state=true (the native layouts hold no initial WKV state" in str(err.value)
    assert "format=hf" in str(err.value) and not (tmp_path / "out").exists()
