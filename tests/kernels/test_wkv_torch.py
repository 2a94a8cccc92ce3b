"""The chunked torch backends against the step-by-step reference, and the dispatch in kernels/__init__."""

from __future__ import annotations

import re

import pytest
import torch

import kernels
from kernels.reference import wkv6_reference, wkv7_reference
from tests.kernels.conftest import (
    WKV6_LOG_DECAY_MIN,
    WKV7_LOG_DECAY_MIN,
    assert_all_close,
    concat_runs,
    leaf,
    leaves,
    outputs_and_grads,
    random_state,
    rel_err,
    run_with_grads,
    time_slice,
    wkv6_inputs,
    wkv7_inputs,
)

OPS = {
    "wkv7": (kernels.wkv7, wkv7_reference, wkv7_inputs, WKV7_LOG_DECAY_MIN),
    "wkv6": (kernels.wkv6, wkv6_reference, wkv6_inputs, WKV6_LOG_DECAY_MIN),
}
FP64_TOL = 1e-10


def torch_backend(op):
    return lambda *args, **kw: op(*args, backend="torch", **kw)


def compare_with_reference(name: str, B: int, T: int, H: int, N: int, *, dtype: torch.dtype,
                           tol: float, scale: float = 0.5, **input_kw) -> None:
    """Backend on `dtype` inputs vs the float64 reference on the same (rounded) values: o, s_T, all grads."""
    op, reference, make_inputs, _ = OPS[name]
    inputs = make_inputs(B, T, H, N, dtype=dtype, **input_kw)
    s0 = random_state(B, H, N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got = run_with_grads(torch_backend(op), leaves(inputs), leaf(s0), scale=scale)
    ref = run_with_grads(reference, leaves(inputs, torch.float64), leaf(s0, torch.float64),
                         scale=scale)
    assert_all_close(got, ref, tol)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("N", [8, 16, 32])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
def test_matches_reference_fp64(name, T, N):
    compare_with_reference(name, 2, T, 2, N, dtype=torch.float64, tol=FP64_TOL, seed=T * N)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("where", ["at_lower_bound", "near_zero", "both_ends"])
def test_decay_extremes_fp64(name, where):
    lower = OPS[name][3]
    decay, share = {"at_lower_bound": ((lower, lower), 0.0), "near_zero": ((-1e-6, -1e-9), 0.0),
                    "both_ends": ((-1e-4, -1e-9), 0.5)}[where]
    compare_with_reference(name, 1, 100, 2, 16, dtype=torch.float64, tol=FP64_TOL, decay=decay,
                           lower_bound_share=share)


@pytest.mark.parametrize("name", OPS)
def test_fp32_within_contract(name):
    compare_with_reference(name, 2, 100, 2, 32, dtype=torch.float32, tol=1e-4, lower_bound_share=0.2)


@pytest.mark.parametrize("name", OPS)
def test_decay_gradient_at_lower_bound_fp32(name):
    """All decays at the bound: dw is ~e^5 smaller than the w-independent terms; differentiating those
    through the decay factors put ~6e-5 of rounding into dw (DERIVATION.md), now it is ~3e-7."""
    compare_with_reference(name, 2, 100, 2, 32, dtype=torch.float32, tol=5e-6, lower_bound_share=1.0)


def test_wkv6_overflowing_masked_pairs_stay_out_fp32():
    """|r|, |k| ~ 300 at log w = -5: pairs above the chunk diagonal reach e^80 * 1e5 = inf in fp32;
    they must be selected away, never multiplied by a mask (inf * 0 = NaN) (DERIVATION.md)."""
    op, reference, make_inputs, lower = OPS["wkv6"]
    x = make_inputs(1, 64, 2, 64, dtype=torch.float32, decay=(lower, lower))
    x["r"], x["k"] = x["r"] * 300, x["k"] * 300
    s0 = random_state(1, 2, 64)
    got = run_with_grads(torch_backend(op), leaves(x), leaf(s0))
    ref = run_with_grads(reference, leaves(x, torch.float64), leaf(s0, torch.float64))
    assert_all_close(got, ref, 1e-4)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_contract(name, dtype):
    compare_with_reference(name, 2, 63, 2, 16, dtype=dtype, tol=1e-2)


@pytest.mark.parametrize("name", OPS)
def test_output_dtype_is_input_dtype_state_fp32(name):
    op, _, make_inputs, _ = OPS[name]
    o, s_T = op(*make_inputs(1, 5, 2, 8, dtype=torch.bfloat16).values(), output_final_state=True,
                backend="torch")
    assert (o.dtype, s_T.dtype) == (torch.bfloat16, torch.float32)




@pytest.mark.parametrize("name", OPS)
def test_packed_sequences_equal_separate_calls(name):
    op, _, make_inputs, _ = OPS[name]
    bounds = [0, 5, 5, 37, 83]  # shorter than a chunk, empty, exactly two chunks, not a chunk multiple
    x = leaves(make_inputs(1, bounds[-1], 2, 16))
    s0 = leaf(random_state(len(bounds) - 1, 2, 16, dtype=torch.float64))
    wrt = {**x, "s0": s0}
    packed = outputs_and_grads(lambda: op(*x.values(), initial_state=s0, output_final_state=True,
                                          cu_seqlens=torch.tensor(bounds), backend="torch"), wrt)
    separate = outputs_and_grads(lambda: concat_runs([
        op(*time_slice(x, start, end).values(), initial_state=s0[i:i + 1], output_final_state=True,
           backend="torch")
        for i, (start, end) in enumerate(zip(bounds, bounds[1:]))]), wrt)
    assert_all_close(packed, separate, 1e-12)
    reference = outputs_and_grads(lambda: OPS[name][1](*x.values(), initial_state=s0, output_final_state=True,
                                                       cu_seqlens=torch.tensor(bounds)), wrt)
    assert_all_close(packed, reference, FP64_TOL)


@pytest.mark.parametrize("name", OPS)
def test_state_passing_equals_one_call(name):
    op, _, make_inputs, _ = OPS[name]
    x = leaves(make_inputs(2, 70, 2, 16))
    s0 = leaf(random_state(2, 2, 16, dtype=torch.float64))
    wrt = {**x, "s0": s0}

    def two_calls():  # the slices are non-contiguous views; 32 is a whole number of chunks, 38 is not
        o1, s1 = op(*time_slice(x, 0, 32).values(), initial_state=s0, output_final_state=True, backend="torch")
        o2, s2 = op(*time_slice(x, 32, 70).values(), initial_state=s1, output_final_state=True, backend="torch")
        return torch.cat([o1, o2], 1), s2

    one = outputs_and_grads(lambda: op(*x.values(), initial_state=s0, output_final_state=True,
                                       backend="torch"), wrt)
    assert_all_close(outputs_and_grads(two_calls, wrt), one, 1e-12)


STEPS = {"wkv7": kernels.wkv7_step, "wkv6": kernels.wkv6_step}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_full_call(name, dtype):
    op, _, make_inputs, _ = OPS[name]
    x = make_inputs(2, 40, 2, 16, dtype=dtype)
    state = random_state(2, 2, 16, dtype=dtype)
    o_full, s_full = op(*x.values(), initial_state=state, output_final_state=True, backend="torch")
    outs = []
    for t in range(40):
        token = [xi if n == "u" else xi[:, t] for n, xi in x.items()]  # [B, H, N] each
        o_t, state = STEPS[name](*token, state, backend="torch")
        outs.append(o_t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(torch.stack(outs, 1), o_full) <= tol
    assert rel_err(state, s_full) <= tol
    assert (outs[0].dtype, state.dtype) == (dtype, dtype)


def small_call(name: str, **changes):
    """kernels.<name> on small valid inputs, with any argument replaced through `changes`."""
    op, _, make_inputs, _ = OPS[name]
    args = {**make_inputs(1, 6, 2, 4, dtype=torch.float32), "backend": "torch", **changes}
    kwargs = {n: args.pop(n) for n in ("initial_state", "cu_seqlens", "backend", "scale") if n in args}
    return op(*args.values(), output_final_state=True, **kwargs)


BAD_INPUTS = [
    ({"v": torch.zeros(1, 5, 2, 4)}, "one shape"),
    ({"r": torch.zeros(6, 2, 4)}, "one shape"),
    ({"initial_state": torch.zeros(2, 2, 4, 4)}, "initial_state must have shape"),
    ({"cu_seqlens": torch.tensor([0, 2, 5])}, "rise from 0 to T=6"),
    ({"cu_seqlens": torch.tensor([0, 4, 2, 6])}, "rise from 0 to T=6"),
    ({"cu_seqlens": torch.tensor([0.0, 6.0])}, "integer"),
    ({"cu_seqlens": torch.tensor([0, 2, 6]), "initial_state": torch.zeros(1, 2, 4, 4)}, "[2, 2, 4, 4]"),
    ({"backend": "cuda"}, "not one of"),
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("changes, message", BAD_INPUTS)
def test_bad_inputs_raise_value_error(name, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        small_call(name, **changes)


@pytest.mark.parametrize("name", OPS)
def test_cu_seqlens_needs_batch_one(name):
    op, _, make_inputs, _ = OPS[name]
    with pytest.raises(ValueError, match="needs B == 1"):
        op(*make_inputs(2, 6, 2, 4).values(), cu_seqlens=torch.tensor([0, 6]), backend="torch")


def test_bad_bonus_and_step_state_raise_value_error():
    with pytest.raises(ValueError, match="u must have shape"):
        small_call("wkv6", u=torch.zeros(2, 5))
    x = [t[:, 0] for t in wkv7_inputs(1, 1, 2, 4, dtype=torch.float32).values()]  # [B, H, N]
    with pytest.raises(ValueError, match="state must have shape"):
        kernels.wkv7_step(*x, torch.zeros(1, 2, 4, 3), backend="torch")


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA inputs or TRITON_INTERPRET=1"):
        small_call("wkv7", backend="triton")


def test_triton_module_missing_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_load_triton", lambda op: f"kernels.{op}_triton is missing")
    with pytest.raises(ValueError, match="unavailable: kernels.wkv6_triton is missing"):
        small_call("wkv6", backend="triton")


@pytest.mark.parametrize("name", OPS)
def test_dispatch_routes_by_backend_and_device(name, monkeypatch):
    calls = []

    def fake_triton(*args, **kwargs):
        calls.append(sorted(kwargs))
        return "triton result"

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_load_triton", lambda op: fake_triton)
    assert small_call(name, backend="triton") == "triton result"
    assert calls == [["cu_seqlens", "initial_state", "output_final_state", "scale"]]
    o_auto, s_auto = small_call(name, backend="auto")  # CPU inputs: auto means torch
    o_torch, s_torch = small_call(name, backend="torch")
    assert len(calls) == 1 and torch.equal(o_auto, o_torch) and torch.equal(s_auto, s_torch)


@pytest.mark.parametrize("N, dtype, loads, picks_triton", [
    (32, torch.bfloat16, True, True),
    (8, torch.bfloat16, True, False),     # DESIGN §4: Triton serves N in {16, 32, 64, 128} only
    (32, torch.float64, True, False),     # nor float64
    (32, torch.float32, False, False),    # its module does not import
])
def test_auto_on_cuda_takes_triton_only_where_it_serves(N, dtype, loads, picks_triton, monkeypatch):
    def fake_triton(*args, **kwargs):
        raise AssertionError("selected only, never called")

    monkeypatch.setattr(kernels, "_load_triton", lambda op: fake_triton if loads else "no module")
    chosen = kernels._select("wkv7", "auto", torch.device("cuda"), N, frozenset({dtype, torch.float32}))
    assert chosen is (fake_triton if picks_triton else kernels._TORCH["wkv7"])
