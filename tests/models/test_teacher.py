"""FrozenTeacher on tiny random HF teachers of every supported family, and load_teacher."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from models import teacher as teacher_module
from models.teacher import FrozenTeacher, check_teacher_family, load_teacher, teacher_head_dim
from tests.models.test_llama2c import CKPT, TOK, needs_assets

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_config(model_type: str, **overrides):
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    return AutoConfig.for_model(model_type, **(sizes | overrides))


def tiny_teacher(model_type: str, seed: int = 0, **overrides):
    """A random 2-layer GQA causal LM; norm weights moved off 1 so that the norms are not no-ops."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    model = tiny_teacher(request.param)
    return model, FrozenTeacher(model), torch.randint(0, 128, (2, 11))


def test_lm_head_of_last_hidden_is_the_logits(family):
    model, teacher, ids = family
    out = teacher(ids)
    torch.testing.assert_close(teacher.lm_head(out.last_hidden), model(ids).logits, rtol=0, atol=1e-6)
    assert len(out.attn_inputs) == len(out.attn_outputs) == len(out.hidden_states) == teacher.num_layers == 2
    assert out.last_hidden.shape == (2, 11, teacher.hidden_size)


def test_hidden_states_match_hf_output_hidden_states(family):
    model, teacher, ids = family
    out = teacher(ids)
    hf = model(ids, output_hidden_states=True).hidden_states  # embeddings, blocks 0..L-2, norm(block L-1)
    for i in range(teacher.num_layers - 1):
        torch.testing.assert_close(out.hidden_states[i], hf[i + 1], rtol=0, atol=0)
    torch.testing.assert_close(model.model.norm(out.hidden_states[-1]), hf[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.last_hidden, hf[-1], rtol=0, atol=0)


def test_attention_inputs_outputs_and_residual_identity(family):
    model, teacher, ids = family
    out = teacher(ids)
    prev = model.model.embed_tokens(ids)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            torch.testing.assert_close(out.attn_inputs[i], layer.input_layernorm(prev), rtol=0, atol=1e-6)
            mid = prev + out.attn_outputs[i]
            block = mid + layer.mlp(layer.post_attention_layernorm(mid))
            torch.testing.assert_close(out.hidden_states[i], block, rtol=1e-5, atol=1e-6)
            prev = out.hidden_states[i]
    assert out.attn_outputs[0].abs().mean() > 1e-3  # the attention contributes: the identity is not 0 == 0


def test_teacher_stays_frozen_inside_a_training_parent():
    model = tiny_teacher("llama").train()
    model.requires_grad_(True)
    parent = nn.ModuleDict({"teacher": FrozenTeacher(model), "student": nn.Linear(4, 4)})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in parent["teacher"].modules())
    assert not any(p.requires_grad for p in parent["teacher"].parameters())
    out = parent["teacher"](torch.randint(0, 128, (1, 5)))
    assert not out.last_hidden.requires_grad and not out.attn_outputs[1].requires_grad


def test_hooks_record_only_inside_forward():
    model = tiny_teacher("qwen3")
    teacher = FrozenTeacher(model)
    ids = torch.randint(0, 128, (1, 7))
    first = teacher(ids)
    model(ids)  # a direct call must not leak activations into the next teacher output
    second = teacher(ids)
    assert len(second.hidden_states) == 2
    torch.testing.assert_close(second.attn_inputs[1], first.attn_inputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", "qwen2_moe", "bert"])
def test_unsupported_families_are_refused(model_type):
    with pytest.raises(ValueError, match=f"{model_type}.*supported model types: llama, mistral, qwen2, qwen3"):
        check_teacher_family(AutoConfig.for_model(model_type))


def test_frozen_teacher_refuses_gpt2():
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="'gpt2'"):
        FrozenTeacher(gpt2)


def test_teacher_head_dim():
    assert teacher_head_dim(tiny_config("llama")) == 16
    assert teacher_head_dim(tiny_config("qwen3", head_dim=32)) == 32


def save_hf_teacher(model, folder: Path) -> Path:
    """Save `model` with a word-level tokenizer over its vocabulary ("w0" .. "w127")."""
    words = models.WordLevel({f"w{i}": i for i in range(model.config.vocab_size)}, unk_token="w0")
    backend = Tokenizer(words)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype,rel_err", [("float32", 0.0), ("bfloat16", 2e-2)])
def test_load_teacher_with_llama3_rope_scaling(tmp_path, dtype, rel_err):
    model = tiny_teacher("llama", rope_parameters=LLAMA3_ROPE)
    loaded, tok = load_teacher(str(save_hf_teacher(model, tmp_path)), dtype=dtype)
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    unscaled = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, 16, 2) / 16)  # [head_dim / 2]
    assert (loaded.model.rotary_emb.inv_freq.float() / unscaled).min() < 0.2  # low frequencies scaled down
    assert loaded.dtype == getattr(torch, dtype) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([tok.encode("w5 w17 w3 w99 w64 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15")])
    assert ids[0, :4].tolist() == [5, 17, 3, 99]
    with torch.no_grad():
        expected, logits = model(ids).logits, loaded(ids).logits.float()
    assert (logits - expected).norm() / expected.norm() <= rel_err


def test_load_teacher_refuses_unsupported_hf_folder(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=128))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported model types"):
        load_teacher(str(save_hf_teacher(gpt2, tmp_path)))


def test_load_teacher_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of .*'float64'"):
        load_teacher("org/name", dtype="float64")
    for missing in [tmp_path / "nope", "./nope", "nope", tmp_path / "org" / "model.bin", "org/model.bin"]:
        with pytest.raises(FileNotFoundError, match=f"teacher '{missing}' not found"):
            load_teacher(str(missing))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_teacher(str(tmp_path))


def test_hub_ids_go_to_the_hub_loader(monkeypatch):
    asked = []

    def offline(path, **kwargs):
        asked.append(path)
        raise OSError("offline")

    monkeypatch.setattr(teacher_module.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError, match="offline"):
        load_teacher("HuggingFaceTB/SmolLM2-135M")
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]


@needs_assets
def test_load_llama2c_teacher(tmp_path):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        load_teacher(str(CKPT))
    model, tok = load_teacher(str(CKPT), tokenizer=str(TOK), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training and len(tok) == 512
    assert not any(p.requires_grad for p in model.parameters())
    out = FrozenTeacher(model)(torch.tensor([[1] + tok.encode("Once upon a time")]))
    assert out.last_hidden.dtype == torch.bfloat16 and len(out.hidden_states) == 5
