"""The WKV ops inside torch.compile (custom ops: one graph, no break) and under autocast.

The Triton path runs on the CPU through TRITON_INTERPRET=1; aot_eager traces the graph and its
backward as inductor would, without generating code (the point is the absence of graph breaks and
equal numbers, not CPU speed).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.conftest import rel_err, wkv6_inputs, wkv7_inputs

OPS = {
    "wkv7": (kernels.wkv7, wkv7_inputs),
    "wkv6": (kernels.wkv6, wkv6_inputs),
}


def _loss(op, inputs, state):
    o, s = op(*inputs, initial_state=state, output_final_state=True, backend="triton")
    return (o.float().sin().sum() + s.cos().sum())


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("with_state", [False, True])
def test_compiled_graph_holds_the_op_and_matches_eager(name, with_state):
    op, make = OPS[name]
    torch._dynamo.reset()
    inputs = [x.float().requires_grad_() for x in make(2, 37, 2, 16, seed=3).values()]
    state = torch.randn(2, 2, 16, 16, requires_grad=True) if with_state else None
    leaves = inputs + ([state] if with_state else [])

    eager = _loss(op, inputs, state)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(lambda *xs: _loss(op, xs[:len(inputs)], state), backend="aot_eager",
                             fullgraph=True)  # fullgraph: a graph break is an error
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, leaves)
    assert value.item() == pytest.approx(eager.item(), rel=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        assert rel_err(g, e) <= 1e-6


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_hands_the_kernel_bf16_operands(name, backend):
    """fp32 operands under bf16 autocast reach the kernel as bf16 (its bf16 path, half the bytes);
    the result keeps the bf16 accuracy contract and the state stays fp32."""
    op, make = OPS[name]
    exact = make(1, 33, 2, 16, seed=5)
    inputs = [x.float() for x in exact.values()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = op(*inputs, output_final_state=True, backend=backend)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref_o, ref_s = getattr(reference, f"{name}_reference")(*(x.to(torch.bfloat16).double() for x in inputs),
                                                                      output_final_state=True)
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(s, ref_s) <= 1e-2


@pytest.mark.parametrize("name", OPS)
def test_a_compiled_op_at_a_second_length_keeps_working_when_segmented(name, monkeypatch):
    """A later stage at another seq_len recompiles the graph: with dynamic=False (as distill/parallel.py
    compiles) the segmented launch plan sees concrete sizes. With symbolic ones it cannot be planned
    (seen on the H200: unhashable SymInt in the segment layout)."""
    import kernels.wkv_triton_walk as walk

    monkeypatch.setattr(walk, "SEGMENT_CHUNKS", 1)  # segment on the CPU too
    op, make = OPS[name]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *xs: _loss(op, xs, None), backend="aot_eager", fullgraph=True, dynamic=False)
    for T in (37, 53):
        inputs = [x.float().requires_grad_() for x in make(1, T, 2, 16, seed=T).values()]
        value = compiled(*inputs)
        grads = torch.autograd.grad(value, inputs)
        eager = _loss(op, inputs, None)
        assert value.item() == pytest.approx(eager.item(), rel=1e-6)
        for g, e in zip(grads, torch.autograd.grad(eager, inputs), strict=True):
            assert rel_err(g, e) <= 1e-6
