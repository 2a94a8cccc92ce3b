"""Devices, precision, strategy and the runtime of the student: every choice about where and how
the job runs, in one place.

The YAML says what the user asked for ("auto" precision, a strategy name, runtime switches); this
module turns that into concrete Lightning arguments and module wrappers. Model code never looks
at devices or strategies. The student is prepared in a fixed order (torchtitan's): activation
checkpointing per block, then torch.compile per block, then the strategy wraps or shards it
(DDP / DeepSpeed, inside Trainer.fit). The frozen teacher is never given to a strategy: it is
replicated in bf16 on every device, or, with strategy.shard_teacher, run as a ZeRO-3 inference engine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
RUNTIME_SWITCHES = ("auto", True, False)


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """'auto' → bf16 mixed precision on a CUDA GPU, full fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_gpu(accelerator) else "32-true"


def on_gpu(accelerator: str = "auto") -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def teacher_dtype(precision: str) -> str:
    """The frozen teacher runs in bf16 whenever the student trains in bf16, else fp32."""
    return "bfloat16" if precision.startswith("bf16") else "float32"


def process_device(accelerator: str = "auto") -> torch.device:
    """This process's device before Lightning sets up: its local rank's GPU, or the CPU. Lets the
    teacher sample data-free text and the job evaluate where it trains."""
    if on_gpu(accelerator):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast a Lightning mixed-precision run trains under, for evaluating the same way."""
    if precision.endswith("-mixed") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()


# ----- strategies -----------------------------------------------------------------------------

def is_deepspeed(strategy: DictConfig) -> bool:
    spec = strategy.lightning
    return not isinstance(spec, str) and spec["_target_"].endswith("DeepSpeedStrategy")


def lightning_strategy(strategy: DictConfig, unused_trainable: bool = False) -> Any:
    """A fresh Lightning strategy for one stage's Trainer, from conf/strategy/<name>.yaml.
    unused_trainable: the stage's loss leaves some trainable parameters without a gradient
    (e.g. align with trainable=new: the FFNs), which DDP must be told about."""
    spec = strategy.lightning
    if isinstance(spec, str):
        return spec
    kwargs = {}
    if unused_trainable and spec["_target_"].endswith("DDPStrategy"):
        kwargs["find_unused_parameters"] = True
    return instantiate(spec, **kwargs)


def check_strategy(strategy: DictConfig, optimizer: DictConfig, lora_stages: Sequence[str] = ()) -> None:
    """Combinations DeepSpeed would refuse deep inside Trainer.fit (or that would fail at a stage's
    end), refused here in one line. lora_stages: the names of the stages with LoRA adapters."""
    spec = strategy.lightning
    if lora_stages and not isinstance(spec, str) and spec.get("stage") == 3:
        # each rank holds a shard of every weight, and the merge at the stage's end (peft, in place) needs whole ones
        raise ValueError(f"stages {list(lora_stages)} use lora, which ZeRO-3 (strategy.lightning.stage=3) cannot "
                         "merge in place; use strategy=ddp or strategy=deepspeed_zero2")
    if strategy.shard_teacher and not is_deepspeed(strategy):
        raise ValueError("strategy.shard_teacher=true shards the teacher with DeepSpeed ZeRO-3 inference; "
                         "use it with strategy=deepspeed_zero2|deepspeed_zero3|deepspeed_zero3_offload")
    offloads = not isinstance(spec, str) and bool(spec.get("offload_optimizer"))
    if offloads and not optimizer["_target_"].endswith("DeepSpeedCPUAdam"):
        raise ValueError(f"strategy offloads the optimizer to the CPU, which needs DeepSpeed's CPU Adam, but "
                         f"optim._target_={optimizer['_target_']}; add optim=deepspeed_cpu_adam")


def uses_deepspeed(trainer) -> bool:
    return type(trainer.strategy).__name__ == "DeepSpeedStrategy"


def deepspeed_grad_norm(trainer) -> float | None:
    """The norm DeepSpeed computed over all ranks' gradient partitions at its last step."""
    norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def shard_teacher(model: nn.Module, precision: str, device: torch.device) -> None:
    """The teacher's decoder as a ZeRO-3 inference engine, in place: its weights partitioned over the
    ranks and gathered layer by layer during the forward (FrozenTeacher's hooks stay on the layers).
    The output head stays whole on `device`: the KL reads its weight outside any module's forward,
    where ZeRO-3 would hand over an empty partition."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": precision.startswith("bf16")}}
    engine, *_ = deepspeed.initialize(model=model.model, config=config)
    engine.eval()
    model.lm_head.to(device)
    model.ds_sharded = True  # its partitions sit on this rank's device: .to() must leave them alone


def declare_external_parameters(module: nn.Module, parameters: Iterable[nn.Parameter]) -> None:
    """Under ZeRO-3, parameters that `module`'s step reads outside their own module's forward (the
    student head's weight in the fused KL): DeepSpeed then gathers them for the whole step and
    reduces their gradients. No-op for parameters ZeRO-3 does not manage."""
    managed = [p for p in parameters if hasattr(p, "ds_id")]
    if managed:
        import deepspeed  # deepspeed.zero is an attribute of the package, not an importable module path

        for p in managed:
            deepspeed.zero.register_external_parameter(module, p)


# ----- the student's runtime ------------------------------------------------------------------

def _switch(runtime: DictConfig, key: str, gpu: bool) -> bool:
    value = runtime[key]
    if value not in RUNTIME_SWITCHES:
        raise ValueError(f"runtime.{key}={value!r} is not one of {RUNTIME_SWITCHES}")
    return gpu if value == "auto" else bool(value)


def configure_runtime(runtime: DictConfig, accelerator: str) -> None:
    """Process-wide settings: TF32 for fp32 matmuls on GPUs."""
    if on_gpu(accelerator) and runtime.tf32:
        torch.set_float32_matmul_precision("high")


def runtime_choices(runtime: DictConfig, accelerator: str, strategy: DictConfig) -> dict[str, Any]:
    """The runtime switches resolved: "auto" compiles the student's blocks on a GPU, except under ZeRO-3
    (its parameter hooks and dynamo do not mix); the teacher's layers only with compile_teacher (not
    sharded); activation checkpointing is off unless asked for."""
    gpu = on_gpu(accelerator)
    zero3 = is_deepspeed(strategy) and strategy.lightning.get("stage") == 3
    compile_student = _switch(runtime, "compile", gpu and not zero3)
    return {"compile": compile_student,
            "compile_teacher": compile_student and bool(runtime.compile_teacher) and not strategy.shard_teacher,
            "compile_backend": runtime.compile_backend,
            "activation_checkpointing": _switch(runtime, "activation_checkpointing", False),
            "tf32": bool(gpu and runtime.tf32)}


def prepare_student(student: nn.Module, choices: dict[str, Any]) -> nn.Module:
    """Activation checkpointing, then torch.compile, block by block (state_dict keys unchanged)."""
    blocks = list(student.layers)
    if choices["activation_checkpointing"]:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(blocks):
            student.layers[i] = checkpoint_wrapper(block)
    if choices["compile"]:
        # Identical blocks share one compiled graph (modules are inlined, their tensors are inputs);
        # layer 0 and the v_first layer differ, so allow a few graphs per code object.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # dynamic=False: each stage has its own fixed shapes, and the WKV ops plan their launches from
        # concrete sizes (a stage at a new seq_len compiled with symbolic sizes failed on the H200)
        for wrapped, block in zip(student.layers, blocks):
            wrapped.compile(backend=choices["compile_backend"], dynamic=False)
            block.time_mix.compile(backend=choices["compile_backend"], dynamic=False)  # align calls them alone
    return student


def prepare_teacher(teacher: nn.Module, choices: dict[str, Any]) -> None:
    """torch.compile each decoder layer of the frozen HF teacher (the activation-recording hooks of
    FrozenTeacher compile with it) when runtime.compile_teacher asks for it."""
    if choices["compile_teacher"]:
        for layer in teacher.model.model.layers:
            layer.compile(backend=choices["compile_backend"], dynamic=False)
