"""distill/parallel.py: strategies from conf/strategy, the student's runtime switches, grad norms."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from distill import parallel
from models.student import StudentConfig, build_student
from tests.distill.helpers import compose_train


def tiny_student():
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=96)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    return build_student(teacher, StudentConfig(w_lora=8, a_lora=8, v_lora=8, g_lora=8))


@pytest.mark.parametrize("compile_, checkpointing", [(False, True), (True, True)])
def test_runtime_wrappers_keep_outputs_gradients_and_checkpoint_keys(compile_, checkpointing):
    """Activation checkpointing and torch.compile change how the student runs, not what it computes:
    same outputs and gradients (the align path through time_mix_outputs too), same state_dict keys
    (checkpoints and exports stay interchangeable)."""
    torch._dynamo.reset()
    plain, wrapped = tiny_student(), tiny_student()
    choices = {"compile": compile_, "compile_backend": "aot_eager", "activation_checkpointing": checkpointing,
               "tf32": False}
    parallel.prepare_student(wrapped, choices)
    assert set(wrapped.state_dict()) == set(plain.state_dict())
    ids = torch.randint(0, 96, (2, 20))
    for model in (plain, wrapped):
        model(ids).last_hidden.square().mean().backward()
        attn = [torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        sum(o.square().mean() for o in model.time_mix_outputs(attn)).backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_teacher_layers_record_the_same_activations():
    from models.teacher import FrozenTeacher

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=96)
    teacher = FrozenTeacher(AutoModelForCausalLM.from_config(config).eval())
    ids = torch.randint(0, 96, (2, 20))
    eager = teacher(ids)
    parallel.prepare_teacher(teacher, {"compile_teacher": True, "compile_backend": "aot_eager"})
    compiled = teacher(ids)
    for field in ("attn_inputs", "attn_outputs", "hidden_states"):
        for a, b in zip(getattr(eager, field), getattr(compiled, field), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled.last_hidden, eager.last_hidden, rtol=1e-6, atol=1e-7)


def test_every_strategy_config_builds_its_lightning_strategy(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    expected = {"auto": str, "ddp": DDPStrategy, "deepspeed_zero2": DeepSpeedStrategy,
                "deepspeed_zero3": DeepSpeedStrategy, "deepspeed_zero3_offload": DeepSpeedStrategy}
    for name, kind in expected.items():
        cfg = compose_train([f"strategy={name}"], tmp_path, tmp_path)
        assert isinstance(parallel.lightning_strategy(cfg.strategy), kind), name
    ddp = compose_train(["strategy=ddp"], tmp_path, tmp_path).strategy
    assert parallel.lightning_strategy(ddp, unused_trainable=True)._ddp_kwargs["find_unused_parameters"]
    zero3 = parallel.lightning_strategy(compose_train(["strategy=deepspeed_zero3"], tmp_path, tmp_path).strategy)
    assert zero3.config["zero_optimization"]["stage"] == 3


def test_strategy_mistakes_are_one_clear_error(tmp_path):
    offload = compose_train(["strategy=deepspeed_zero3_offload"], tmp_path, tmp_path)
    with pytest.raises(ValueError, match="optim=deepspeed_cpu_adam"):
        parallel.check_strategy(offload.strategy, offload.optim)
    parallel.check_strategy(offload.strategy, compose_train(["optim=deepspeed_cpu_adam"], tmp_path, tmp_path).optim)
    shard = compose_train(["strategy.shard_teacher=true"], tmp_path, tmp_path)
    with pytest.raises(ValueError, match="shard_teacher.*deepspeed_zero"):
        parallel.check_strategy(shard.strategy, shard.optim)
    zero3 = compose_train(["strategy=deepspeed_zero3"], tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"stages \['kl'\] use lora, which ZeRO-3"):
        parallel.check_strategy(zero3.strategy, zero3.optim, lora_stages=["kl"])
    parallel.check_strategy(zero3.strategy, zero3.optim)
    zero2 = compose_train(["strategy=deepspeed_zero2"], tmp_path, tmp_path)
    parallel.check_strategy(zero2.strategy, zero2.optim, lora_stages=["kl"])
    with pytest.raises(ValueError, match="runtime.compile='sometimes'"):
        parallel.runtime_choices(OmegaConf.create({"compile": "sometimes", "compile_backend": "inductor",
                                                   "activation_checkpointing": False, "tf32": True}),
                                 "cpu", offload.strategy)


def test_runtime_auto_compiles_on_gpus_only_and_not_under_zero3(tmp_path, monkeypatch):
    cfg = compose_train([], tmp_path, tmp_path)
    assert parallel.runtime_choices(cfg.runtime, "cpu", cfg.strategy)["compile"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choices = parallel.runtime_choices(cfg.runtime, "auto", cfg.strategy)
    assert choices["compile"] is True and choices["compile_teacher"] is False
    zero3 = compose_train(["strategy=deepspeed_zero3"], tmp_path, tmp_path)
    assert parallel.runtime_choices(zero3.runtime, "auto", zero3.strategy)["compile"] is False


def _sharded_teacher_outputs(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    import deepspeed

    from models.teacher import FrozenTeacher

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=96)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    replicated = FrozenTeacher(model)(ids)
    parallel.shard_teacher(model, "32-true", torch.device("cpu"))
    sharded = FrozenTeacher(model)(ids)
    partitioned = model.model.layers[0].mlp.up_proj.weight.ds_tensor.numel()
    if rank == 0:
        torch.save({"replicated": replicated, "sharded": sharded, "partitioned": partitioned,
                    "full": model.model.layers[0].mlp.up_proj.weight.ds_numel,
                    "head": model.lm_head.weight.numel()}, out)


@pytest.mark.slow
def test_zero3_sharded_teacher_gives_the_replicated_teachers_activations(tmp_path):
    """strategy.shard_teacher: the teacher's decoder partitioned over 2 gloo ranks (real DeepSpeed
    ZeRO-3 inference) returns the same per-layer activations as the whole teacher; its head stays whole."""
    import torch.multiprocessing as mp

    from tests.distill.test_checkpoints import _free_port

    out = tmp_path / "out.pt"
    mp.spawn(_sharded_teacher_outputs, args=(_free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    assert got["partitioned"] == got["full"] // 2  # each rank holds half of a weight
    assert got["head"] == 96 * 32
    for field in ("attn_inputs", "attn_outputs", "hidden_states"):
        for a, b in zip(getattr(got["replicated"], field), getattr(got["sharded"], field), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["sharded"].last_hidden, got["replicated"].last_hidden, rtol=1e-6, atol=1e-6)
