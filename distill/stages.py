"""Training stages (DESIGN §3): what one `Trainer.fit` of the job trains, on what, for how long.

A job runs its stages in order. Each stage is a plain record built from one entry of the
config's `stages:` list; steps follow from the token budget and the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from distill.lora import LoraSpec, check_targets
from kernels.linear_kl import KINDS
from models.student import StudentLM

LOSSES = ("align", "kl")
# time_mix: the converted time mixes; new: those plus non-teacher FFNs (ffn=rwkv); all: the whole student;
# state: only each RWKV layer's initial WKV state (student.learned_initial_state=true); none: nothing
# besides the LoRA adapters (a stage with lora). With lora, the group trains in full except the Linear
# layers that LoRA wraps: those stay frozen and their adapters train instead.
TRAINABLE = ("time_mix", "new", "all", "state", "none")


@dataclass(frozen=True)
class Stage:
    name: str
    loss: str  # "align": time-mix outputs vs teacher attention; "kl": full-model logits (+ hidden, CE)
    tokens: int  # token budget of the stage (global, over all ranks)
    seq_len: int
    batch_size: int  # per device, per micro-step
    lr: float
    trainable: str = "all"
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0  # λ of the hidden-state alignment term
    ce_weight: float = 0.0  # β of the cross-entropy term
    temperature: float = 1.0
    kind: str = "forward"  # divergence of the kl loss: forward KL(p_t||p_s), reverse KL(p_s||p_t), jsd
    beta: float = 0.5  # jsd's mixture weight of the teacher, m = beta p_t + (1 - beta) p_s
    lora: LoraSpec | None = None  # {r, alpha, dropout, target_modules} (distill/lora.py); None: no adapters

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"stage {self.name!r}: loss={self.loss!r} is not one of {LOSSES}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"stage {self.name!r}: trainable={self.trainable!r} is not one of {TRAINABLE}")
        if isinstance(self.lora, dict):
            try:
                object.__setattr__(self, "lora", LoraSpec.of(self.lora))
            except ValueError as err:
                raise ValueError(f"stage {self.name!r}: {err}") from None
        if self.lora is not None and self.trainable == "all":
            raise ValueError(f"stage {self.name!r}: lora trains adapters instead of the weights, but trainable=all "
                             "trains every weight too; set trainable: none (adapters only), or state / time_mix / "
                             "new to train that group in full beside the adapters")
        if self.lora is None and self.trainable == "none":
            raise ValueError(f"stage {self.name!r}: trainable=none trains nothing without lora; give the stage a "
                             "lora: {r, alpha, dropout, target_modules} or another trainable group")
        for key in ("tokens", "seq_len", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stage {self.name!r}: {key}={getattr(self, key)} must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"stage {self.name!r}: warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError(f"stage {self.name!r}: temperature={self.temperature} must be > 0")
        weights = {k: getattr(self, k) for k in ("kl_weight", "ce_weight", "hidden_weight")}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"stage {self.name!r}: the loss weights {weights} must all be >= 0")
        if self.loss == "kl" and self.kl_weight == self.ce_weight == 0:
            raise ValueError(f"stage {self.name!r}: kl_weight and ce_weight are both 0 for loss='kl'; set one "
                             f"of them > 0 (ce_weight alone: language-model training on the labels)")
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name!r}: kind={self.kind!r} is not one of {KINDS}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"stage {self.name!r}: beta={self.beta} must lie in (0, 1) for kind='jsd'")

    def tokens_per_step(self, world_size: int, accumulate: int) -> int:
        return self.batch_size * self.seq_len * world_size * accumulate

    def steps(self, world_size: int = 1, accumulate: int = 1, cap: int | None = None) -> int:
        """Optimizer steps that spend the token budget (at least 1), optionally capped."""
        steps = max(1, math.ceil(self.tokens / self.tokens_per_step(world_size, accumulate)))
        return min(steps, cap) if cap else steps


def check_fits(stage: Stage, student: StudentLM) -> None:
    """ValueError when the stage asks for what the student lacks: an initial state to tune, or
    LoRA targets it has not (checked when the job starts, not when the stage does)."""
    if stage.trainable == "state" and next(student.initial_state_parameters(), None) is None:
        why = ("has no RWKV layer" if student.config.learned_initial_state
               else "was built without them; add the override student.learned_initial_state=true")
        raise ValueError(f"stage {stage.name!r}: trainable=state learns each RWKV layer's initial WKV state, "
                         f"but this student {why}")
    if stage.lora is None:
        return
    try:
        check_targets(student, stage.lora)
    except ValueError as err:
        raise ValueError(f"stage {stage.name!r}: {err}") from None
    if "lm_head" in {t.rsplit(".", 1)[-1] for t in stage.lora.target_modules}:
        raise ValueError(f"stage {stage.name!r}: lora.target_modules names lm_head, but the kl loss reads the "
                         "head's weight directly (the fused linear KL never calls the layer), so its adapter would "
                         "learn nothing; leave lm_head out")


def stages_from_config(entries: list[dict[str, Any]]) -> list[Stage]:
    """Build stages from config entries; unknown keys are an error, not silently ignored."""
    if not entries:
        raise ValueError("the config's `stages:` list is empty: give at least one stage (see conf/stages/)")
    known = {f.name for f in fields(Stage)}
    stages = []
    for entry in entries:
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"stage {entry.get('name')!r}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        stages.append(Stage(**entry))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    return stages
