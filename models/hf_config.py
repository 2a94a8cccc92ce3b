"""The Hugging Face configuration of an exported student (distill-export format=hf).

It holds, as plain JSON, what StudentLM(shape, cfg, rotary_emb) needs: the teacher's shape, the
resolved StudentConfig, and the teacher's own config (its RoPE settings rebuild rotary_emb).
distill-export writes this file into the folder as configuration_rwkv_distill.py.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class RWKVDistillConfig(PretrainedConfig):
    model_type = "rwkv_distill"

    def __init__(self, student: dict[str, Any] | None = None, teacher_shape: dict[str, Any] | None = None,
                 teacher_config: dict[str, Any] | None = None, rotary_class: str | None = None,
                 distill: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        """student: StudentConfig fields; teacher_shape: TeacherShape fields; teacher_config: the
        teacher's config.to_dict(); rotary_class: "module.Class" of the teacher's rotary embedding;
        distill: where the student came from (checkpoint, teacher path) for distill-eval."""
        self.student = student or {}
        self.teacher_shape = teacher_shape or {}
        self.teacher_config = teacher_config or {}
        self.rotary_class = rotary_class
        self.distill = distill or {}
        self.use_cache = use_cache  # forward returns the recurrent state unless told not to
        shape = self.teacher_shape
        # the usual names, for tools that read them (lm-eval's max length, generation)
        self.vocab_size = shape.get("vocab_size")
        self.hidden_size = shape.get("hidden_size")
        self.num_hidden_layers = shape.get("num_layers")
        self.max_position_embeddings = self.teacher_config.get("max_position_embeddings")
        kwargs["tie_word_embeddings"] = False  # the student's lm_head is its own
        super().__init__(**kwargs)
