"""LoRA stages: a stage with `lora: {r, alpha, dropout, target_modules}` trains peft's low-rank
adapters on the student's Linear layers instead of their weights (as LoLCATs converts 70B models),
so a big student's frozen base needs no gradients and no optimizer state.

The adapters' life in a job:
- `Adapters(student, spec)` injects them in place (peft's LoraModel; the student keeps its class). A
  wrapped Linear's keys become <name>.base_layer.{weight,bias} and <name>.lora_{A,B}.default.weight.
- A mid-stage checkpoint holds those keys, and its `distill` record holds the spec (`lora`), so a
  resume injects the same adapters before Lightning restores weights and optimizer state.
- At the stage's end, after its stage-end record is written, `merge()` folds them into the base
  weights (peft's merge_and_unload: W + alpha/r B A) and removes them: later stages, the end-of-run
  evaluation and every reader see a plain student.
- Readers of a checkpoint (distill-export, distill-eval, resume from a stage-end record) call
  `load_student`: adapters in the state dict are injected with the recorded spec, loaded, merged.

peft is imported only when a stage has LoRA (its import pulls in torchao).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

# LoLCATs's defaults: rank 8, alpha 16, no dropout, the attention projections
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LoraSpec:
    """One stage's LoRA: rank r, scale alpha / r, dropout on the adapter's input, and the Linear
    layers it wraps (names as in the student's state dict: a leaf name such as q_proj matches it in
    every layer, a dotted suffix such as layers.0.time_mix.q_proj one layer)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"lora.target_modules={self.target_modules!r} must be a list of module names, "
                             f"e.g. {list(ATTENTION_PROJECTIONS)}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora.r={self.r!r} must be a positive integer rank")
        if not _is_number(self.alpha) or not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be > 0 (the adapter's scale is alpha / r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r} must lie in [0, 1)")
        if not self.target_modules:
            raise ValueError(f"lora.target_modules is empty: name the Linear layers to adapt, e.g. "
                             f"{list(ATTENTION_PROJECTIONS)}")

    @classmethod
    def of(cls, entry: dict[str, Any]) -> LoraSpec:
        """From a config entry; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(entry, dict):
            raise ValueError(f"lora={entry!r} must be a mapping with keys {sorted(known)} (or null: no LoRA)")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"lora has unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**entry)

    def peft_config(self, **extra: Any):
        """peft's LoraConfig of this spec; extra: more LoraConfig fields (e.g. task_type)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), **extra)

    def record(self) -> dict[str, Any]:
        """As plain data, for the checkpoint's `distill` record (LoraSpec.of reads it back)."""
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}


def linear_names(student: nn.Module) -> list[str]:
    """The leaf names of the student's nn.Linear layers: what target_modules may name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in student.named_modules() if isinstance(m, nn.Linear)})


def check_targets(student: nn.Module, spec: LoraSpec) -> None:
    """ValueError unless every target names at least one module, and only nn.Linear ones (the
    student's own low-rank pieces, e.g. w_lora, are not Linear layers)."""
    modules = dict(student.named_modules())
    for target in spec.target_modules:
        found = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not found or not all(isinstance(m, nn.Linear) for m in found):
            why = "matches no module" if not found else "is not an nn.Linear layer"
            raise ValueError(f"lora.target_modules: {target!r} {why} of this student; its Linear layers are "
                             f"{linear_names(student)}")


class Adapters:
    """peft LoRA adapters injected into `student` in place, until merge(). A plain object, not a
    module: whoever holds it keeps the student's state dict keys as they are."""

    def __init__(self, student: nn.Module, spec: LoraSpec) -> None:
        from peft import LoraModel

        check_targets(student, spec)
        self.spec = spec
        self._tuner = LoraModel(student, spec.peft_config(), "default")

    def _layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self._tuner.model.modules() if isinstance(m, LoraLayer)]

    def parameters(self) -> list[nn.Parameter]:
        """The adapters' A and B matrices: what a LoRA stage trains."""
        return [p for layer in self._layers() for name, p in layer.named_parameters()
                if not name.startswith("base_layer.")]

    def base_parameters(self) -> list[nn.Parameter]:
        """The wrapped layers' own weights and biases: frozen while their adapters train."""
        return [p for layer in self._layers() for p in layer.get_base_layer().parameters()]

    def merge(self) -> None:
        """Fold every adapter into its base weight and put the plain Linear back, in place."""
        self._tuner.merge_and_unload()


def load_student(student: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's (read_checkpoint's dict) `student.*` weights into a plain student. One
    taken during a LoRA stage records its spec (`distill.lora`): the adapters are injected, loaded
    and merged, so the student ends plain either way."""
    prefix = "student."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    lora = checkpoint["distill"].get("lora")
    adapters = None if lora is None else Adapters(student, LoraSpec.of(lora))
    student.load_state_dict(state)
    if adapters is not None:
        adapters.merge()
