"""The fused linear-KL operator (kernels/linear_kl*.py) against the float64 full-logits reference.

Torch backend: float64 inputs, rel <= 1e-6 (it is exact up to float64 rounding). Triton backend on CPU
(TRITON_INTERPRET=1, tiny blocks so every shape edge is crossed): float32 inputs and IEEE dots, rel <= 1e-5:
the logits are fp32 dots over C <= 24 and the exp-sums run over V = 150 entries in 3 splits, where fp32
rounding gave 3e-7 to 2.4e-6 (measured over the six kind/tau/CE cases); bf16 inputs: 1e-2 (dz rounded to
bf16 gave 3.5e-3). The `gpu` tests run the H200 shape in bf16 at 1e-2.
Every check covers the loss, the four statistics and both gradients (h_s and w_s).
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.linear_kl_torch as torch_mod
from kernels.linear_kl import fused_linear_kl
from kernels.linear_kl_reference import linear_kl_reference
from tests.kernels.conftest import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("forward", "reverse", "jsd")
# (temperature, ce_weight): plain KL, and tempered with the CE term on (both log-sum-exps per model)
SETTINGS = [(1.0, 0.0), (2.5, 0.3)]


def make_inputs(N: int = 21, C_s: int = 24, C_t: int = 20, V: int = 150, *, seed: int = 0,
                dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict:
    """h_s [N, C_s], w_s [V, C_s], h_t [N, C_t], w_t [V, C_t], labels [N]; logits of spread ~3 (as an
    LM's) so the distributions are neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    x = {"h_s": torch.randn(N, C_s, generator=gen, dtype=torch.float64),
         "w_s": torch.randn(V, C_s, generator=gen, dtype=torch.float64) * (3 / math.sqrt(C_s)),
         "h_t": torch.randn(N, C_t, generator=gen, dtype=torch.float64),
         "w_t": torch.randn(V, C_t, generator=gen, dtype=torch.float64) * (3 / math.sqrt(C_t))}
    x = {k: v.to(dtype).to(device) for k, v in x.items()}
    x["labels"] = torch.randint(0, V, (N,), generator=gen).to(device)
    return x


def run(fn, x: dict, dtype: torch.dtype | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """loss, stats (means [4]) and the gradients of the loss for h_s and w_s, on fresh leaves."""
    h_s, w_s = (x[k].detach().to(dtype or x[k].dtype).requires_grad_() for k in ("h_s", "w_s"))
    h_t, w_t = (x[k].to(dtype or x[k].dtype) for k in ("h_t", "w_t"))
    loss, stats = fn(h_s, w_s, h_t, w_t, x["labels"], **kwargs)
    dh, dw = torch.autograd.grad(loss, [h_s, w_s])
    if fn is fused_linear_kl:
        stats = stats / h_s.shape[0]
    return {"loss": loss, "stats": stats, "dh": dh, "dw": dw}


def assert_matches(got: dict, ref: dict, tol: float, top1_atol: float = 1e-12) -> None:
    """loss, kl and both NLLs, dh and dw within relative error tol; top-1 agreement (a fraction of
    tokens) within top1_atol: near-ties may flip a token's argmax at bf16 accumulation-order changes."""
    errors = {"loss": rel_err(got["loss"], ref["loss"]), "dh": rel_err(got["dh"], ref["dh"]),
              "dw": rel_err(got["dw"], ref["dw"])}
    errors.update({f"stats[{i}]": rel_err(got["stats"][i], ref["stats"][i]) for i in range(3)})
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    assert got["stats"][3].item() == pytest.approx(ref["stats"][3].item(), abs=top1_atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature, ce_weight", SETTINGS + [(0.7, 0.0)])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_torch_backend_matches_reference(kind, temperature, ce_weight, chunk):
    x = make_inputs(N=23)
    kw = dict(temperature=temperature, kind=kind, beta=0.3, ce_weight=ce_weight)
    got = run(fused_linear_kl, x, backend="torch", chunk_tokens=chunk, **kw)
    assert_matches(got, run(linear_kl_reference, x, **kw), 1e-6)


@pytest.mark.usefixtures("nan_poison")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature, ce_weight", SETTINGS)
def test_triton_matches_reference_fp32(kind, temperature, ce_weight):
    """N = 21: a partial second token tile; V = 150: a partial last block (32) and split (64); C_s = 24,
    C_t = 20: partial channel steps (16); NaN-poisoned buffers: every partial is written."""
    x = make_inputs()
    kw = dict(temperature=temperature, kind=kind, beta=0.3, ce_weight=ce_weight)
    got = run(fused_linear_kl, x, torch.float32, backend="triton", **kw)
    assert got["loss"].dtype == torch.float32 and got["dw"].dtype == torch.float32
    assert_matches(got, run(linear_kl_reference, x, **kw), 1e-5)


@pytest.mark.usefixtures("nan_poison")
def test_triton_dz_in_several_chunks(monkeypatch):
    """The gradient pass in chunks of 16 tokens (a budget of 16 rows of dz) gives the one-chunk result."""
    import kernels.linear_kl_triton as triton_mod

    x = make_inputs(N=37)
    kw = dict(kind="reverse", temperature=1.5, ce_weight=0.2, backend="triton")
    whole = run(fused_linear_kl, x, torch.float32, **kw)
    monkeypatch.setattr(triton_mod, "DZ_BUDGET_BYTES", 16 * 150 * 4)
    assert triton_mod._dz_rows(150, 4, triton_mod.INTERPRETER_BLOCKS) == 16
    chunked = run(fused_linear_kl, x, torch.float32, **kw)
    for key in ("loss", "stats", "dh", "dw"):
        assert rel_err(chunked[key], whole[key]) <= 1e-6, key


def test_triton_bf16_matches_reference():
    """bf16 inputs (the training dtype): bf16 dots, fp32 statistics, dz rounded to bf16."""
    x = make_inputs(seed=3)
    xb = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in x.items()}
    kw = dict(kind="forward", temperature=1.0, ce_weight=0.5)
    got = run(fused_linear_kl, xb, backend="triton", **kw)
    assert got["dh"].dtype == torch.bfloat16
    assert_matches(got, run(linear_kl_reference, xb, torch.float64, **kw), 1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kl_weight, ce_weight", [(0.4, 0.3), (0.0, 1.0)])
def test_kl_weight_scales_the_divergence_term(backend, kl_weight, ce_weight):
    """loss = kl_weight tau^2 D + ce_weight CE, gradients included; kl_weight = 0 leaves CE training
    alone (the from-scratch baseline's stage)."""
    x = make_inputs(N=19)
    kw = dict(temperature=1.5, kind="reverse", ce_weight=ce_weight, kl_weight=kl_weight)
    dtype = torch.float32 if backend == "triton" else None
    got = run(fused_linear_kl, x, dtype, backend=backend, **kw)
    assert_matches(got, run(linear_kl_reference, x, **kw), 1e-5 if backend == "triton" else 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_ce_weight_sends_no_ce_gradient(backend):
    """With ce_weight = 0 the gradient is the one of a call that has no labels at all, up to rounding
    (labels weigh each counted token by 1 / count, no labels divide by N)."""
    x = make_inputs()
    dtype = torch.float64 if backend == "torch" else torch.float32
    with_labels = run(fused_linear_kl, x, dtype, backend=backend, kind="jsd", ce_weight=0.0)
    no_labels = run(fused_linear_kl, {**x, "labels": None}, dtype, backend=backend, kind="jsd")
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert rel_err(with_labels["dh"], no_labels["dh"]) <= tol and rel_err(with_labels["dw"], no_labels["dw"]) <= tol
    assert rel_err(with_labels["loss"], no_labels["loss"]) <= tol
    assert math.isnan(no_labels["stats"][1].item()) and math.isnan(no_labels["stats"][2].item())
    ce = run(fused_linear_kl, x, dtype, backend=backend, kind="jsd", ce_weight=0.5)
    assert rel_err(ce["dh"], with_labels["dh"]) > 0.1  # the CE term does reach the gradient when asked


def test_identical_models_have_zero_divergence():
    x = make_inputs()
    x["h_t"], x["w_t"] = x["h_s"], x["w_s"]
    for kind in KINDS:
        got = run(fused_linear_kl, x, backend="torch", kind=kind)
        assert abs(got["loss"].item()) < 1e-12 and got["dh"].abs().max() < 1e-12
        assert got["stats"][3].item() == 1.0


def test_no_grad_forward_keeps_no_gradient_and_matches():
    x = make_inputs()
    ref = run(fused_linear_kl, x, backend="torch", kind="reverse")
    with torch.no_grad():
        loss, sums = fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"], kind="reverse",
                                     backend="torch")
    assert not loss.requires_grad and torch.equal(loss, ref["loss"].detach())


def test_autocast_runs_the_heads_in_bf16_and_returns_input_dtype_grads():
    """Under bf16 autocast (the training step's precision) the matmuls run in bf16, while the fp32
    master weight and fp32 hidden states get fp32 gradients."""
    x = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fused_linear_kl, x, backend="torch", kind="forward", ce_weight=0.1)
    assert got["dh"].dtype == torch.float32 and got["dw"].dtype == torch.float32
    xb = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in x.items()}
    ref = run(linear_kl_reference, xb, torch.float64, kind="forward", ce_weight=0.1)
    assert_matches(got, ref, 1e-2)
    assert rel_err(got["loss"], run(linear_kl_reference, x, kind="forward", ce_weight=0.1)["loss"]) > 1e-6


@pytest.mark.parametrize("bad, match", [
    (dict(kind="kl"), "kind='kl' is not one of"),
    (dict(kind="jsd", beta=1.0), "beta=1.0 must lie in"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(backend="cuda"), "backend='cuda' is not one of"),
    (dict(ce_weight=0.5, labels=None), "needs labels"),
    (dict(kl_weight=0.0), "kl_weight=0.0, ce_weight=0.0: both must be >= 0 and one of them > 0"),
    (dict(kl_weight=-1.0, ce_weight=1.0), "kl_weight=-1.0"),
    (dict(w_s=torch.zeros(150, 23, dtype=torch.float64)), "heads must be"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must be \[N\]"),
])
def test_bad_arguments_are_named(bad, match):
    x, bad = make_inputs(), dict(bad)
    args = {k: bad.pop(k, x[k]) for k in ("h_s", "w_s", "h_t", "w_t", "labels")}
    with pytest.raises(ValueError, match=match):
        fused_linear_kl(*args.values(), **bad)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = make_inputs()
    with pytest.raises(ValueError, match="needs CUDA inputs or TRITON_INTERPRET=1"):
        fused_linear_kl(x["h_s"].float(), x["w_s"].float(), x["h_t"].float(), x["w_t"].float(), backend="triton")


def test_auto_takes_torch_on_cpu(monkeypatch):
    calls = []
    real = torch_mod.linear_kl_torch
    monkeypatch.setattr("kernels.linear_kl.linear_kl_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_inputs()
    fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], backend="auto")
    assert calls == [1]


# ----- GPU: the H200 shape of issue 12 (Qwen2.5-0.5B teacher: C = 896, V = 151936) ----------------
GPU_SHAPE = dict(N=4096, C_s=896, C_t=896, V=151936)


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_triton_matches_reference_bf16(kind):
    """bf16 inputs at the real shape vs the reference on the same bf16 values in fp32 (full logits)."""
    x = make_inputs(**GPU_SHAPE, dtype=torch.bfloat16, device="cuda", seed=1)
    kw = dict(kind=kind, beta=0.5, temperature=1.0, ce_weight=0.0)
    got = run(fused_linear_kl, x, backend="triton", **kw)
    ref = run(linear_kl_reference, x, torch.float32, **kw)
    assert_matches(got, ref, 1e-2, top1_atol=1e-3)


@pytest.mark.gpu
def test_gpu_triton_peak_memory_far_below_full_logits():
    """Forward+backward peak of the Triton path <= 1/4 of the full-logits one (training: bf16)."""
    x = make_inputs(**GPU_SHAPE, dtype=torch.bfloat16, device="cuda", seed=2)
    fused = _peak_bytes(lambda: run(fused_linear_kl, x, backend="triton", kind="forward"))
    full = _peak_bytes(lambda: run(linear_kl_reference, x, torch.float32, kind="forward"))
    assert fused <= 0.25 * full, f"fused peak {fused / 2**30:.2f} GiB vs full logits {full / 2**30:.2f} GiB"
