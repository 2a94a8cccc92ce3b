"""WKV operators (DESIGN §5): one entry point per operator, dispatching on `backend`.

backend "torch": chunked pure PyTorch (any device). "triton": the Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1). "auto": triton for CUDA inputs when its module imports and serves
the head size and dtypes (kernels.wkv_triton_common.SUPPORTED_N / SUPPORTED_DTYPES), torch otherwise.
Inputs are validated here once, so the backends can assume them well formed.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

# Imported as modules so that `kernels.wkv7_torch` stays the module, not its function.
from kernels import wkv6_torch as _wkv6_torch
from kernels import wkv7_torch as _wkv7_torch

__all__ = ["wkv7", "wkv6", "wkv7_step", "wkv6_step"]

BACKENDS = ("auto", "torch", "triton")
_TORCH = {
    "wkv7": _wkv7_torch.wkv7_torch, "wkv6": _wkv6_torch.wkv6_torch,
    "wkv7_step": _wkv7_torch.wkv7_step_torch, "wkv6_step": _wkv6_torch.wkv6_step_torch,
}


# Plain import statements, not importlib: torch.compile traces these (a lookup in sys.modules once the
# module is loaded) and keeps the op in one graph; importlib would break the graph.
def _load_triton(op: str) -> Callable | str:
    """The Triton function for op ("wkv7", "wkv7_step", ...), or why it cannot be imported."""
    try:
        if op.startswith("wkv7"):
            from kernels import wkv7_triton as module
        else:
            from kernels import wkv6_triton as module
    except ImportError as err:
        return f"kernels.{op.removesuffix('_step')}_triton cannot be imported ({err})"
    return getattr(module, f"{op}_triton")


def _triton_serves(N: int, dtypes: frozenset[torch.dtype]) -> bool:
    """Whether the Triton kernels take head size N and these input dtypes (they serve a few N only)."""
    try:
        from kernels import wkv_triton_common as common
    except ImportError:
        return False
    return N in common.SUPPORTED_N and dtypes <= set(common.SUPPORTED_DTYPES)


def _select(op: str, backend: str, device: torch.device, N: int, dtypes: frozenset[torch.dtype]) -> Callable:
    """The function that runs op for the requested backend on inputs of head size N on device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return _TORCH[op]
    if backend == "auto":
        found = _load_triton(op) if device.type == "cuda" and _triton_serves(N, dtypes) else None
        return found if callable(found) else _TORCH[op]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA inputs or TRITON_INTERPRET=1, got inputs on "
                         f"{device}; use backend='torch' or 'auto' there")
    found = _load_triton(op)
    if not callable(found):
        raise ValueError(f"backend='triton' is unavailable: {found}; use backend='torch' or 'auto'")
    return found


def _backend_for(op: str, backend: str, *inputs: Tensor) -> Callable:
    """_select for these inputs ([.., N] each; the first one's device)."""
    return _select(op, backend, inputs[0].device, inputs[0].shape[-1], frozenset(x.dtype for x in inputs))


def _autocast_operands(*xs: Tensor) -> tuple[Tensor, ...]:
    """Under autocast, the operands in the autocast dtype (bf16 on a GPU), as autocast treats a matmul:
    the products that make them promote to fp32 against fp32 parameters, and the kernels would then run
    their fp32 path and move fp32 bytes. States stay fp32 (they are not passed here)."""
    device = xs[0].device.type
    if not torch.is_autocast_enabled(device):
        return xs
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) for x in xs)


def _run(fn: Callable, device: torch.device, *args, **kwargs):
    """fn outside autocast: the backends accumulate and keep states in fp32 themselves (the contract),
    which autocast would otherwise narrow inside the torch backend's matmuls."""
    with torch.autocast(device.type, enabled=False):
        return fn(*args, **kwargs)


def _check_same_shape(names: str, tensors: tuple[Tensor, ...], ndim: int, layout: str) -> None:
    """Every tensor has the shape of the first, with ndim dimensions; else ValueError naming them."""
    shapes = [tuple(x.shape) for x in tensors]
    if len(shapes[0]) != ndim or any(s != shapes[0] for s in shapes):
        shown = ", ".join(f"{n}={s}" for n, s in zip(names.split(), shapes))
        raise ValueError(f"{names.replace(' ', ', ')} must all have one shape {layout}, got {shown}")


def _check_u(u: Tensor, H: int, N: int) -> None:
    if tuple(u.shape) != (H, N):
        raise ValueError(f"u must have shape [H, N] = {[H, N]}, got {list(u.shape)}")


def _check_sequences(B: int, T: int, H: int, N: int, initial_state: Tensor | None,
                     cu_seqlens: Tensor | None) -> None:
    """cu_seqlens: 1-D int, B == 1, 0 = c_0 <= c_1 <= ... = T; initial_state: [n_seqs, H, N, N]."""
    n_seqs = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: needs B == 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor [n_seqs + 1], got "
                             f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(e < s for s, e in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {bounds}")
        n_seqs = len(bounds) - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seqs, H, N, N):
        raise ValueError(f"initial_state must have shape [n_seqs, H, K, V] = {[n_seqs, H, N, N]}, "
                         f"got {list(initial_state.shape)}")


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = S_t^T (scale r_t).

    r, w, k, v, a, b: [B, T, H, N] (w the log decay); initial_state: [B or n_seqs, H, K, V];
    cu_seqlens: [n_seqs + 1] packed sequence starts, B == 1.
    Returns o [B, T, H, V] in the input dtype (the autocast dtype under autocast) and s_T
    [B or n_seqs, H, K, V] fp32 (None unless asked).
    """
    _check_same_shape("r w k v a b", (r, w, k, v, a, b), 4, "[B, T, H, N]")
    _check_sequences(*r.shape, initial_state, cu_seqlens)
    r, w, k, v, a, b = _autocast_operands(r, w, k, v, a, b)
    fn = _backend_for("wkv7", backend, r, w, k, v, a, b)
    return _run(fn, r.device, r, w, k, v, a, b, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor,
    *, scale: float = 1.0, initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """o_t = S_{t-1}^T (scale r_t) + (scale r_t . (u * k_t)) v_t;  S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T.

    r, k, v, w: [B, T, H, N] (w the log decay); u: [H, N]; other arguments as for wkv7.
    Returns o [B, T, H, V] in the input dtype and s_T [B or n_seqs, H, K, V] (None unless asked).
    """
    _check_same_shape("r k v w", (r, k, v, w), 4, "[B, T, H, N]")
    _check_u(u, *r.shape[2:])
    _check_sequences(*r.shape, initial_state, cu_seqlens)
    r, k, v, w, u = _autocast_operands(r, k, v, w, u)
    fn = _backend_for("wkv6", backend, r, k, v, w, u)
    return _run(fn, r.device, r, k, v, w, u, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _check_step_state(state: Tensor, B: int, H: int, N: int) -> None:
    if tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"state must have shape [B, H, K, V] = {[B, H, N, N]}, got {list(state.shape)}")


def wkv7_step(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
    *, scale: float = 1.0, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One WKV7 token for recurrent generation (forward only).

    r, w, k, v, a, b: [B, H, N]; state: [B, H, K, V] float32. Returns (o [B, H, V], new state).
    """
    _check_same_shape("r w k v a b", (r, w, k, v, a, b), 3, "[B, H, N]")
    _check_step_state(state, *r.shape)
    r, w, k, v, a, b = _autocast_operands(r, w, k, v, a, b)
    return _run(_backend_for("wkv7_step", backend, r, w, k, v, a, b), r.device, r, w, k, v, a, b, state, scale=scale)


def wkv6_step(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor,
    *, scale: float = 1.0, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One WKV6 token for recurrent generation (forward only).

    r, k, v, w: [B, H, N]; u: [H, N]; state: [B, H, K, V] float32. Returns (o [B, H, V], new state).
    """
    _check_same_shape("r k v w", (r, k, v, w), 3, "[B, H, N]")
    _check_u(u, *r.shape[1:])
    _check_step_state(state, *r.shape)
    r, k, v, w, u = _autocast_operands(r, k, v, w, u)
    return _run(_backend_for("wkv6_step", backend, r, k, v, w, u), r.device, r, k, v, w, u, state, scale=scale)
