"""Devices, precision and strategy: every choice about where and how the job runs, in one place.

The YAML says what the user asked for ("auto" precision, a strategy name); this module turns
that into concrete Lightning arguments. Model code never looks at devices or strategies.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """'auto' → bf16 mixed precision on a CUDA GPU, full fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {PRECISIONS}")
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def teacher_dtype(precision: str) -> str:
    """The frozen teacher runs in bf16 whenever the student trains in bf16, else fp32."""
    return "bfloat16" if precision.startswith("bf16") else "float32"
