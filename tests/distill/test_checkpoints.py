"""distill.checkpoints.read_checkpoint: Lightning files and real DeepSpeed ZeRO directories.

The ZeRO checkpoints are written by DeepSpeed itself (two gloo processes on the CPU, the call
Lightning's DeepSpeedStrategy.save_checkpoint makes), so consolidation is tested on the real layout.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

from distill.checkpoints import CheckpointError, read_checkpoint
from distill.module import DistillModule
from models.student import StudentConfig, build_student
from models.teacher import FrozenTeacher, load_teacher


TINY_STUDENT = StudentConfig(w_lora=8, a_lora=8, v_lora=8, g_lora=8)


def tiny_module(teacher_path: str = "") -> DistillModule:
    """A random 2-layer teacher (or the HF teacher at teacher_path) and its RAD-RWKV7 student."""
    torch.manual_seed(0)
    if teacher_path:
        teacher = load_teacher(teacher_path)[0]
    else:
        config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=96)
        teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = build_student(teacher, TINY_STUDENT)
    return DistillModule(FrozenTeacher(teacher), student, torch.optim.AdamW)


def _write_zero(rank: int, world_size: int, port: int, stage: int, out: str, teacher_path: str = "") -> None:
    """A ZeRO checkpoint as DeepSpeed writes it; with teacher_path, its record names that teacher
    (as distill-train's does), so distill-eval and distill-export can rebuild the models."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    module = tiny_module(teacher_path)
    module.student.embed_tokens.requires_grad_(False)  # a frozen part, as in the align stage
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    ids = torch.randint(0, 96, (1, 12))
    loss = engine.module.student(ids).last_hidden.square().mean()
    engine.backward(loss)
    engine.step()
    record = {"stage_index": 1}
    if teacher_path:
        record["config"] = {"teacher": {"_target_": "models.teacher.load_teacher", "path": teacher_path},
                            "student": dataclasses.asdict(TINY_STUDENT), "data": {}}
    engine.save_checkpoint(out, client_state={"distill": record, "global_step": 1}, tag="checkpoint")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if rank == 0:
            torch.save({k: v.detach().clone().float() for k, v in engine.module.state_dict().items()},
                       Path(out).parent / "reference.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_directory_consolidates_to_the_full_fp32_student(tmp_path, stage):
    out = tmp_path / "last.ckpt"
    mp.spawn(_write_zero, args=(2, _free_port(), stage, str(out)), nprocs=2, join=True)
    checkpoint = read_checkpoint(out)
    reference = torch.load(tmp_path / "reference.pt")
    assert checkpoint["distill"] == {"stage_index": 1} and checkpoint["global_step"] == 1
    assert set(checkpoint["state_dict"]) == set(reference)
    for key, value in reference.items():
        assert checkpoint["state_dict"][key].dtype == torch.float32
        torch.testing.assert_close(checkpoint["state_dict"][key], value, rtol=0, atol=0, msg=key)
    record_only = read_checkpoint(out, weights=False)
    assert record_only["distill"] == {"stage_index": 1} and record_only["state_dict"] == {}


def test_lightning_file_reads_back(tmp_path):
    module = tiny_module()
    state = {f"student.{k}": v for k, v in module.student.state_dict().items()}
    torch.save({"state_dict": state, "distill": {"stage_index": 0}}, tmp_path / "a.ckpt")
    checkpoint = read_checkpoint(tmp_path / "a.ckpt")
    assert checkpoint["state_dict"].keys() == state.keys()


def test_truncated_file_is_one_clear_error(tmp_path):
    module = tiny_module()
    torch.save({"state_dict": module.state_dict(), "distill": {}}, tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "a.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        read_checkpoint(tmp_path / "a.ckpt")
    assert "\n" not in str(info.value)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a distill-train checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.ckpt")
