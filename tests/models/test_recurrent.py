"""The recurrent state protocol: one parallel forward, token-by-token forwards and two chunks give
the same outputs and states for every registered student type (time mix x FFN x hybrid) and
teacher family; generate() equals greedy decoding by repeated full forwards."""

import pytest
import torch

from models.layers import token_shift
from models.student import StudentConfig, StudentLM, build_student
from tests.models.test_student import FAMILIES, STUDENT_TYPES, make_teacher, type_id


def make_student(family: str, student_type, seed: int = 0) -> StudentLM:
    """A float64 student of a 2-layer teacher, its new parameters moved off their init (zero
    LoRA inputs, identity lerps) so that every term and every carried state shows in the output."""
    time_mix, ffn, attention_layers = student_type
    student = build_student(make_teacher(family, seed=seed),
                            StudentConfig(time_mix=time_mix, ffn=ffn, attention_layers=attention_layers))
    with torch.no_grad():
        for p in student.new_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return student


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def assert_states_close(state, ref) -> None:
    assert state.position == ref.position
    for got, want in zip(state.time_mix + state.ffn, ref.time_mix + ref.ffn, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].shape == want[key].shape, key
            assert rel(got[key], want[key]) <= 1e-10, key


@pytest.mark.parametrize("student_type", STUDENT_TYPES, ids=type_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_recurrent_chunked_and_generate_agree(family, student_type):
    torch.manual_seed(1)
    student = make_student(family, student_type)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = student(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):  # one token at a time: the step kernels
            out = student(ids[:, t:t + 1], state)
            steps.append(out.last_hidden)
            state = out.state
    first = student(ids[:, :4])  # with autograd: chunked kernels from a carried state
    second = student(ids[:, 4:], first.state)
    chunked = torch.cat((first.last_hidden, second.last_hidden), dim=1)
    assert rel(torch.cat(steps, dim=1), full.last_hidden) <= 1e-10
    assert rel(chunked, full.last_hidden) <= 1e-10
    for i, h in enumerate(full.hidden_states):  # every block, not only the last
        assert rel(torch.cat((first.hidden_states[i], second.hidden_states[i]), dim=1), h) <= 1e-10
    assert full.state.position == 9
    assert_states_close(state, full.state)
    assert_states_close(second.state, full.state)
    # the state is what carries the past: the second chunk from a fresh start differs
    assert rel(student(ids[:, 4:]).last_hidden, second.last_hidden) > 1e-3
    prompt = ids[:, :5]
    assert torch.equal(student.generate(prompt, max_new_tokens=4),
                       greedy_by_full_forwards(student, prompt, 4))


def greedy_by_full_forwards(student: StudentLM, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """ids [B, T] -> [B, T + new_tokens]: each token the argmax of a forward over everything so far."""
    with torch.no_grad():
        for _ in range(new_tokens):
            token = student.logits(ids)[:, -1].argmax(-1)  # [B]
            ids = torch.cat((ids, token[:, None]), dim=1)
    return ids


def test_generate_stops_rows_at_eos():
    torch.manual_seed(3)
    student = make_student("llama", STUDENT_TYPES[0])
    ids = torch.randint(0, 61, (3, 4))
    free = student.generate(ids, max_new_tokens=8)  # [3, 12]
    eos = int(free[0, 5])  # row 0's second new token
    out = student.generate(ids, max_new_tokens=8, eos_token_id=eos)
    stops = []  # per row: new tokens up to and including its first eos (or all 8)
    for row in free[:, 4:].tolist():
        stops.append(row.index(eos) + 1 if eos in row else 8)
    assert out.shape == (3, 4 + max(stops))
    for b, stop in enumerate(stops):
        assert torch.equal(out[b, :4 + stop], free[b, :4 + stop])
        assert torch.all(out[b, 4 + stop:] == eos)
    assert torch.equal(student.generate(ids, max_new_tokens=0), ids)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        student.generate(ids, max_new_tokens=-1)


def test_generate_stops_once_every_row_has_eos():
    student = make_student("qwen2", STUDENT_TYPES[0])
    ids = torch.randint(0, 61, (1, 3)).expand(2, 3)  # two equal rows emit the same tokens
    first = student.generate(ids, max_new_tokens=1)[0, -1]
    out = student.generate(ids, max_new_tokens=5, eos_token_id=int(first))
    assert out.shape == (2, 4) and torch.all(out[:, -1] == first)


def test_token_shift_reads_the_carried_input():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    fresh = token_shift(x, None)
    assert torch.all(fresh[:, 0] == 0) and torch.equal(fresh[:, 1:], x[:, :2])
    carried = token_shift(x, {"shift": torch.full((2, 4), 7.0, dtype=torch.float64)})
    assert torch.all(carried[:, 0] == 7) and torch.equal(carried[:, 1:], x[:, :2])
    # two chunks, each fed the previous chunk's last input, shift like the whole sequence
    whole = torch.randn(1, 6, 4, dtype=torch.float64)
    chunks = torch.cat((token_shift(whole[:, :2], None),
                        token_shift(whole[:, 2:], {"shift": whole[:, 1]})), dim=1)
    assert torch.equal(chunks, token_shift(whole, None))
