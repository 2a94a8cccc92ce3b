"""Shared helpers for WKV kernel tests (every backend): valid random inputs, a fixed-cotangent
forward+backward runner, relative Frobenius error, and NaN-poisoned allocations.

Inputs are dicts in the operator's positional order, so `op(*inputs.values(), ...)` calls it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

WKV7_LOG_DECAY_MIN = -math.exp(-0.5)  # RAD-RWKV7: log w = -e^{-1/2} sigmoid(.)
WKV6_LOG_DECAY_MIN = -5.0             # RAD-RWKV6: log w = max(-exp(.), -5)
NEAR_ZERO_LOG_DECAY = -1e-6           # decay 0.999999: state kept almost unchanged


def log_decay(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator,
              dtype: torch.dtype = torch.float64, lower_bound_share: float = 0.0) -> Tensor:
    """Log decays uniform in [low, high]; a random share of the entries set exactly to low."""
    w = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
    at_bound = torch.rand(shape, generator=gen, dtype=torch.float64) < lower_bound_share
    return w.masked_fill(at_bound, low).to(dtype)


def wkv7_inputs(B: int, T: int, H: int, N: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                decay: tuple[float, float] = (WKV7_LOG_DECAY_MIN, NEAR_ZERO_LOG_DECAY),
                lower_bound_share: float = 0.0) -> dict[str, Tensor]:
    """r, w, k, v, a, b [B, T, H, N] as RAD-RWKV7 makes them: a = -kk, b = kk * alpha with kk
    unit-norm per head and alpha in (0, 1), so every transition diag(e^w) + b a^T is a contraction."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)
    alpha = torch.rand(shape, generator=gen, dtype=torch.float64)
    w = log_decay(shape, *decay, gen, lower_bound_share=lower_bound_share)
    raw = {"r": r, "w": w, "k": k, "v": v, "a": -kk, "b": kk * alpha}
    return {name: x.to(dtype) for name, x in raw.items()}


def wkv6_inputs(B: int, T: int, H: int, N: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                decay: tuple[float, float] = (WKV6_LOG_DECAY_MIN, NEAR_ZERO_LOG_DECAY),
                lower_bound_share: float = 0.0) -> dict[str, Tensor]:
    """r, k, v, w [B, T, H, N] and the bonus u [H, N] in the positional order of wkv6."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    w = log_decay(shape, *decay, gen, lower_bound_share=lower_bound_share)
    u = torch.randn(H, N, generator=gen, dtype=torch.float64)
    return {name: x.to(dtype) for name, x in {"r": r, "k": k, "v": v, "w": w, "u": u}.items()}


def random_state(n: int, H: int, N: int, *, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """A state [n, H, K, V] of the size states reach in use (entries ~ 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, N, N, generator=gen, dtype=torch.float64).to(dtype)


def leaf(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh leaf copy (optionally cast) that requires grad, so two runs never share gradients."""
    return x.detach().to(dtype or x.dtype).requires_grad_()


def leaves(tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """`leaf` of every tensor of an inputs dict."""
    return {n: leaf(x, dtype) for n, x in tensors.items()}


def cotangent(shape: torch.Size, dtype: torch.dtype, seed: int) -> Tensor:
    """Fixed random cotangent, rounded through bf16 so every dtype sees exactly the same values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.bfloat16).to(dtype)


def outputs_and_grads(forward: Callable[[], tuple[Tensor, Tensor]], wrt: dict[str, Tensor],
                      *, seed: int = 7) -> dict[str, Tensor]:
    """o, s_T = forward() and the gradient of <o, g_o> + <s_T, g_s> (fixed random g) for every
    leaf in wrt, as {"o", "s_T", "d<name>"}. Two forwards over the same leaves that compute the
    same function (e.g. packed vs separate calls) must return the same dict."""
    o, s_T = forward()
    g_o, g_s = cotangent(o.shape, o.dtype, seed), cotangent(s_T.shape, s_T.dtype, seed + 1)
    loss = (o * g_o.to(o.device)).sum() + (s_T * g_s.to(s_T.device)).sum()
    grads = torch.autograd.grad(loss, list(wrt.values()))
    return {"o": o, "s_T": s_T, **{f"d{n}": g for n, g in zip(wrt, grads)}}


def run_with_grads(op: Callable, inputs: dict[str, Tensor], initial_state: Tensor | None = None,
                   *, seed: int = 7, **kwargs) -> dict[str, Tensor]:
    """outputs_and_grads of op(*inputs, initial_state=..., output_final_state=True, **kwargs);
    inputs and initial_state must be leaves requiring grad (see `leaves`)."""
    wrt = dict(inputs) if initial_state is None else {**inputs, "initial_state": initial_state}
    return outputs_and_grads(
        lambda: op(*inputs.values(), initial_state=initial_state, output_final_state=True, **kwargs),
        wrt, seed=seed)


def time_slice(inputs: dict, start: int, end: int) -> dict:
    """The tokens start:end of every [B, T, H, N] input (u [H, N] has no time axis)."""
    return {n: x if n == "u" else x[:, start:end] for n, x in inputs.items()}


def concat_runs(runs: list[tuple]) -> tuple:
    """(o, s_T) of consecutive or parallel calls -> o joined along T, states along the batch."""
    return torch.cat([o for o, _ in runs], 1), torch.cat([s for _, s in runs])


def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref||_F / ||ref||_F in float64; inf when x holds a NaN or an inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_all_close(got: dict[str, Tensor], ref: dict[str, Tensor], tol: float) -> None:
    """Every entry of ref within relative Frobenius error tol; the message lists all errors."""
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.fixture
def nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like / Tensor.new_empty return NaN-filled floating tensors, so an output
    element a kernel forgets to write shows up as NaN instead of leftover memory."""
    def poisoned(make: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            x = make(*args, **kwargs)
            if x.is_floating_point():
                with torch.no_grad():
                    x.fill_(math.nan)
            return x
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


@pytest.fixture(autouse=True)
def single_thread():
    """Kernel tests use tiny tensors, where intra-op threads only add synchronisation; on a shared
    CPU their spin-waits made these tests 10-20x slower. Restores the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to tf32 (10 mantissa bits, to nearest), as tensor cores read tf32 operands."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)


@pytest.fixture
def tf32_dots(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the Triton interpreter, dots asked for tf32 round their operands to tf32 as a GPU does
    (the interpreter otherwise multiplies in full fp32), so CPU tests see the GPU's dot precision."""
    import triton.runtime.interpreter as interpreter

    exact_dot = interpreter.InterpreterBuilder.create_dot

    def tf32_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).endswith("TF32"):  # not TF32x3 (about fp32) nor IEEE
            a = interpreter.TensorHandle(round_to_tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(round_to_tf32(b.data), b.dtype)
        return exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", tf32_dot)
