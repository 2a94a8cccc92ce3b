"""How far each student time mix is from the teacher attention it replaces.

Shapes: B batch, T time, C model width, L layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.student import StudentLM
from models.teacher import FrozenTeacher


@torch.no_grad()
def alignment_errors(teacher: FrozenTeacher, student: StudentLM, input_ids: Tensor) -> list[float]:
    """Per layer, the mean over the B*T tokens of ||y_teacher - y_student||_2 / sqrt(C), where
    y_teacher is the teacher's attention output and y_student the student's time mix (a kept
    attention layer: its trainable copy), both fed the teacher's attention input of that layer:
    the align stage's loss, layer by layer. input_ids: [B, T] -> L floats."""
    target = teacher(input_ids)
    outputs = student.time_mix_outputs(target.attn_inputs)  # L x [B, T, C]
    return [layer_error(t, s) for t, s in zip(target.attn_outputs, outputs, strict=True)]


def layer_error(target: Tensor, pred: Tensor) -> float:
    """target, pred: [B, T, C] -> mean over tokens of ||target - pred||_2 / sqrt(C), in float64."""
    diff = target.double() - pred.double()
    return (diff.norm(dim=-1).mean() / math.sqrt(diff.shape[-1])).item()
