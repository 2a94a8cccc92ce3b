"""Hybrid students chosen after training started: which converted layers go back to the teacher's
softmax attention, and the student that keeps them.

A hybrid built this way is exactly the model `build_student` makes for the final
`attention_layers` list (so a checkpoint that records the list rebuilds it), with every weight
the trained student already had carried over, and the newly kept layers copied from the teacher.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from models.student import StudentLM, build_student


def check_kept_count(k: int, num_layers: int) -> None:
    """ValueError unless 1 <= k <= num_layers - 1 (at least one layer must stay RWKV)."""
    if not 1 <= k <= num_layers - 1:
        raise ValueError(f"attention_layers=auto:{k}: the teacher has {num_layers} layers; valid: "
                         f"auto:1 .. auto:{num_layers - 1}")


def worst_layers(errors: list[float], k: int) -> list[int]:
    """The k layer indices with the largest errors (ties: the lower index), in ascending order."""
    ranked = sorted(range(len(errors)), key=lambda i: (-errors[i], i))
    return sorted(ranked[:k])


def with_kept_attention(student: StudentLM, teacher: nn.Module, layers: list[int]) -> StudentLM:
    """A new student that keeps the teacher's attention in `layers` besides those it already keeps.

    The new kept layers are fresh copies of the teacher's attention (as build_student makes them);
    every other weight is the trained student's. What the old student had and the new one has not
    is dropped: the RWKV time mixes of those layers, and the value-residual LoRA of the layer that
    becomes the v_first layer when the old one turns to attention. Same device and dtype."""
    kept = sorted(set(student.config.attention_layers) | set(layers))
    new = build_student(teacher, dataclasses.replace(student.config, attention_layers=kept))
    fresh = tuple(f"layers.{i}.time_mix." for i in layers)
    keys = set(new.state_dict())
    carried = {k: v for k, v in student.state_dict().items() if k in keys and not k.startswith(fresh)}
    loaded = new.load_state_dict(carried, strict=False)
    assert all(k.startswith(fresh) for k in loaded.missing_keys), loaded.missing_keys
    ref = next(student.parameters())
    return new.to(device=ref.device, dtype=ref.dtype)
