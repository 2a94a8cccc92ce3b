"""student=rwkv7_native: RWKV-7 time mix + channel mix + LayerNorms (and ln0), a plain RWKV-7 model."""

import torch
import torch.nn.functional as F

from models.student import LAYER_NORM_EPS, StudentConfig, build_student
from tests.models.test_student import make_teacher

NATIVE = StudentConfig(time_mix="rwkv7", ffn="rwkv", norm="layer")


def test_layer_norms_take_the_teacher_rms_weights_and_ln0_keeps_the_embedding_scale():
    teacher = make_teacher("llama")
    student = build_student(teacher, NATIVE)
    for block, layer in zip(student.layers, teacher.model.layers, strict=True):
        assert isinstance(block.input_layernorm, torch.nn.LayerNorm)
        torch.testing.assert_close(block.input_layernorm.weight, layer.input_layernorm.weight, rtol=0, atol=0)
        torch.testing.assert_close(block.post_attention_layernorm.weight, layer.post_attention_layernorm.weight,
                                   rtol=0, atol=0)
        assert block.input_layernorm.bias.abs().max() == 0 and block.input_layernorm.eps == LAYER_NORM_EPS
    torch.testing.assert_close(student.norm.weight, teacher.model.norm.weight, rtol=0, atol=0)
    E = teacher.model.embed_tokens.weight
    ln0 = student.ln0(E)  # [V, C]: each row re-centred and scaled to the mean row std
    var = E.var(-1, unbiased=False, keepdim=True)
    expected = (E - E.mean(-1, keepdim=True)) / (var + LAYER_NORM_EPS).sqrt() * var.sqrt().mean()
    torch.testing.assert_close(ln0, expected, rtol=1e-6, atol=1e-6)


def test_the_forward_is_layer_norms_around_the_rwkv_blocks():
    """h = ln0(emb); each block: h += time_mix(LN1 h); h += cmix(LN2 h); out = LN_out h."""
    torch.manual_seed(0)
    student = build_student(make_teacher("llama"), NATIVE)
    with torch.no_grad():
        for p in student.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        h = F.layer_norm(student.embed_tokens(ids), (32,), student.ln0.weight, student.ln0.bias, LAYER_NORM_EPS)
        v_first = None
        for block in student.layers:
            out, v_first, _ = block.time_mix(F.layer_norm(h, (32,), block.input_layernorm.weight,
                                                          block.input_layernorm.bias, LAYER_NORM_EPS), None, v_first)
            h = h + out
            h = h + block.mlp(F.layer_norm(h, (32,), block.post_attention_layernorm.weight,
                                           block.post_attention_layernorm.bias, LAYER_NORM_EPS))[0]
        expected = F.layer_norm(h, (32,), student.norm.weight, student.norm.bias, LAYER_NORM_EPS)
        torch.testing.assert_close(student(ids).last_hidden, expected, rtol=1e-12, atol=1e-12)


def test_every_layer_norm_parameter_is_new_and_the_rms_students_are_unchanged():
    teacher = make_teacher("llama")
    native = build_student(teacher, NATIVE)
    new = {id(p) for p in native.new_parameters()}
    names = [n for n, p in native.named_parameters() if "layernorm" in n or n.startswith(("ln0", "norm."))]
    assert len(names) == 2 * 1 + 2 * 2 * 2 + 2  # ln0, 2 layers x 2 norms, the final norm; weight + bias each
    assert all(id(dict(native.named_parameters())[n]) in new for n in names)
    rms = build_student(teacher, StudentConfig(time_mix="rwkv7", ffn="rwkv"))
    assert rms.ln0 is None and not any(k.startswith("ln0") or k.endswith("layernorm.bias") for k in rms.state_dict())


def test_token_by_token_equals_the_parallel_forward():
    torch.manual_seed(0)
    student = build_student(make_teacher("mistral"), NATIVE)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = student(ids).last_hidden
        state, steps = None, []
        for t in range(ids.shape[1]):
            out = student(ids[:, t:t + 1], state)
            steps.append(out.last_hidden)
            state = out.state
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
