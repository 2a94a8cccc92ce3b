"""models/hybrid.py: a trained student turned hybrid keeps its weights and gets exact teacher
attention in the chosen layers, as build_student would have made it."""

import pytest
import torch

from models.attention import TeacherAttention
from models.hybrid import check_kept_count, with_kept_attention, worst_layers
from models.student import StudentConfig, build_student
from tests.models.test_student import make_teacher


def trained(student):
    """The student with every parameter moved, as training would."""
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student


@pytest.mark.parametrize("kept, chosen", [([], [2]), ([], [0, 3]), ([1], [3])])
def test_with_kept_attention_is_build_student_with_the_trained_weights(kept, chosen):
    torch.manual_seed(0)
    teacher = make_teacher("llama", num_hidden_layers=4)
    student = trained(build_student(teacher, StudentConfig(attention_layers=kept)))
    hybrid = with_kept_attention(student, teacher, chosen)
    layers = sorted(kept + chosen)
    assert hybrid.config.attention_layers == layers
    reference = build_student(teacher, StudentConfig(attention_layers=layers))
    assert {k: v.shape for k, v in hybrid.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}  # what a checkpoint of the list rebuilds
    old, new = student.state_dict(), hybrid.state_dict()
    for i in chosen:
        assert isinstance(hybrid.layers[i].time_mix, TeacherAttention)
        for name, p in hybrid.layers[i].time_mix.named_parameters():
            assert torch.equal(p, teacher.model.layers[i].self_attn.get_parameter(name)), (i, name)
    fresh = tuple(f"layers.{i}.time_mix." for i in chosen)
    for key, value in new.items():
        if not key.startswith(fresh):
            assert torch.equal(value, old[key]), key
    assert hybrid.embed_tokens.weight.dtype == student.embed_tokens.weight.dtype


def test_choosing_layer_0_moves_v_first_and_drops_that_layers_value_residual():
    torch.manual_seed(1)
    teacher = make_teacher("llama", num_hidden_layers=3)
    student = trained(build_student(teacher, StudentConfig()))
    assert student.layers[1].time_mix.v_lora is not None
    hybrid = with_kept_attention(student, teacher, [0])
    assert hybrid.config.v_first_layer == 1 and hybrid.layers[1].time_mix.v_lora is None
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():  # a consistent model: parallel and recurrent forwards agree
        full = hybrid(ids).last_hidden
        first = hybrid(ids[:, :2])
        rest = hybrid(ids[:, 2:], first.state).last_hidden
    assert torch.allclose(torch.cat((first.last_hidden, rest), 1), full, rtol=0, atol=1e-10)


def test_worst_layers_takes_the_largest_errors_in_index_order():
    assert worst_layers([0.02, 0.9, 0.3, 1.8, 0.5], 2) == [1, 3]
    assert worst_layers([0.1, 0.5, 0.5], 1) == [1]  # a tie goes to the lower index


@pytest.mark.parametrize("k", [0, 4, -1])
def test_kept_count_outside_1_to_L_minus_1_is_refused(k):
    with pytest.raises(ValueError, match=rf"auto:{k}: the teacher has 4 layers; valid: auto:1 \.\. auto:3"):
        check_kept_count(k, 4)
