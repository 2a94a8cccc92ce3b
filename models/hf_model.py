"""A StudentLM as a Hugging Face causal LM (distill-export format=hf): from_pretrained, generate,
pipelines and lm-eval-harness run it with transformers alone.

distill-export writes this file into the folder as modeling_rwkv_distill.py, beside copies of the
models/ and kernels/ files it imports (imports made relative): the math has one source, here.

Generation runs from the recurrent state: the prompt in one parallel forward, then one token per
forward with the StudentState carried in `recurrent_state` (fixed size in RWKV layers, a KV cache
only in kept attention layers). The state travels under its own name, not transformers' `Cache`
(whose argument name and interface differ between transformers releases), through the two hooks
generate() calls on every model: prepare_inputs_for_generation and _update_model_kwargs_for_generation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from models.hf_config import RWKVDistillConfig
from models.student import StudentConfig, StudentLM, StudentState, TeacherShape


@dataclass
class RWKVDistillOutput(ModelOutput):
    """loss: [] when labels are given; logits: [B, T', V] (T' = logits_to_keep or T);
    recurrent_state: after the last token (use_cache); hidden_states: the residual after each block."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    recurrent_state: StudentState | None = None
    hidden_states: tuple[Tensor, ...] | None = None


def rotary_embedding(config: RWKVDistillConfig) -> nn.Module:
    """The teacher's rotary embedding, rebuilt by its own transformers class from its own config."""
    module, name = config.rotary_class.rsplit(".", 1)
    teacher_config = AutoConfig.for_model(**config.teacher_config)
    return getattr(importlib.import_module(module), name)(config=teacher_config)


def check_padding(attention_mask: Tensor | None) -> None:
    """Every row of attention_mask [B, T] must be ones then (right padding) zeros: each token enters
    the recurrent state, so a padding token before a real one would change what follows it."""
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask has left padding (or a gap): the recurrent student feeds every token "
                         "into its state, so batch only prompts of one length (or use batch size 1)")


class RWKVDistillForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RWKVDistillConfig
    base_model_prefix = "student"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # a recurrent state: generate() must not roll tokens back (assisted decoding)

    def __init__(self, config: RWKVDistillConfig) -> None:
        super().__init__(config)
        shape = dict(config.teacher_shape)
        if shape.get("sliding_windows") is not None:
            shape["sliding_windows"] = tuple(shape["sliding_windows"])
        self.student = StudentLM(TeacherShape(**shape), StudentConfig(**config.student), rotary_embedding(config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.student.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.student.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                recurrent_state: StudentState | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None, logits_to_keep: int = 0,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> RWKVDistillOutput:
        """input_ids: [B, T], continuing recurrent_state when given (then only the new tokens);
        logits for the last logits_to_keep positions (0 = all)."""
        check_padding(attention_mask)
        out = self.student(input_ids, recurrent_state)
        hidden = out.last_hidden[:, -logits_to_keep:] if logits_to_keep else out.last_hidden
        logits = self.student.lm_head(hidden)  # [B, T', V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return RWKVDistillOutput(loss=loss, logits=logits, recurrent_state=out.state if use_cache else None,
                                 hidden_states=tuple(out.hidden_states) if output_hidden_states else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, recurrent_state: StudentState | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      logits_to_keep: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Only the tokens the state has not seen: the whole prompt first, then one token per step."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate(inputs_embeds=...) is not supported: pass input_ids")
        if recurrent_state is not None:
            input_ids = input_ids[:, recurrent_state.position:]
        inputs = {"input_ids": input_ids, "recurrent_state": recurrent_state, "attention_mask": attention_mask,
                  "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: RWKVDistillOutput, model_kwargs: dict[str, Any],
                                            *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["recurrent_state"] = outputs.recurrent_state
        return model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is ours (recurrent_state), not a transformers KV cache
