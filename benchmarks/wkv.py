"""Speed of the WKV kernels against the public anchor (issue 3), all in one run on one GPU.

For each (B, T, H, N): median time (triton.testing.do_bench) of forward and forward+backward, bf16
inputs, for our Triton WKV-7 / WKV-6 (in each tuning variant given), fla's chunk_rwkv7 (its default
chunk and with lower_bound=-e^{-1/2}, which licenses its 64-chunk path) and chunk_rwkv6, torch SDPA
causal (flash) at the same shape, and the bytes floor: bytes that must move / measured copy bandwidth.

    python benchmarks/wkv.py --out wkv.json [--variants default,noseg] [--shapes 8x4096x16x64,...] [--budget_s S]

Prints a table last and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton
from triton.testing import do_bench

import kernels.wkv6_triton as wkv6_mod
import kernels.wkv7_triton as wkv7_mod
import kernels.wkv_triton_common as common_mod
import kernels.wkv_triton_walk as walk_mod

SHAPES = [(8, 4096, 16, 64), (8, 4096, 64, 64), (2, 16384, 16, 64), (1, 65536, 16, 64)]
BF16 = 2  # bytes per element

# our tuning variants: module attributes set before timing (value block, warps, segmenting, inverse precision)
VARIANTS = {
    "default": {},
    "bv32": dict(block_v=lambda N: 32),
    "bwd_w4": dict(BWD_WARPS=4),
    "noseg": dict(SEGMENT_BELOW=0),
    "seg1": dict(SEGMENT_BELOW=1),
    "seg2x": dict(SEGMENT_PROGRAMS_PER_SM=2),  # v3's cut: ~2 x SMs programs
    "seg4x": dict(SEGMENT_PROGRAMS_PER_SM=4),
    "seg8x": dict(SEGMENT_PROGRAMS_PER_SM=8),  # v3.3 to v3.9's cut
    "fwd_w8": dict(FWD_WARPS=8),  # two warps per scheduler in the forward walk (ncu: one issues every ~4 cycles)
    # the triangular inverse's dots for half inputs: IEEE fp32 (v3.3) or tf32x3 instead of tf32
    "inv_ieee": dict(HALF_INVERSE_PRECISION="ieee"),
    "inv_tf32x3": dict(HALF_INVERSE_PRECISION="tf32x3"),
    # the forward with no backward to follow (the no_grad column) in 16- or 32-token chunks; their
    # forward+backward is the default's, so it is not timed (INFERENCE_ONLY). 64-token chunks spill
    # 1 KB at 8 warps (local sm_90 report) and are not offered
    "infer16": dict(INFER_BT=16, INFER_WARPS=4),
    "infer32": dict(INFER_BT=32, INFER_WARPS=4),
    "infer32_w8": dict(INFER_BT=32, INFER_WARPS=8),
}
INFERENCE_ONLY = {name for name, attrs in VARIANTS.items() if attrs and all(k.startswith("INFER_") for k in attrs)}


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def wkv7_inputs(B, T, H, N):
    """bf16 r, w, k, v, a, b as the RAD-RWKV7 layer makes them (a = -kk, b = kk * gate, |kk| = 1)."""
    rnd = lambda: torch.randn(B, T, H, N, device="cuda")  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    xs = (rnd(), -math.exp(-0.5) * torch.sigmoid(rnd()), rnd(), rnd(), -kk, kk * torch.sigmoid(rnd()))
    return [x.bfloat16().requires_grad_() for x in xs]


def wkv6_inputs(B, T, H, N):
    rnd = lambda: torch.randn(B, T, H, N, device="cuda")  # noqa: E731
    w = torch.clamp(-torch.exp(rnd() - 1), min=-5.0)
    xs = [x.bfloat16().requires_grad_() for x in (rnd(), rnd(), rnd(), w)]
    return xs + [torch.randn(H, N, device="cuda").bfloat16().requires_grad_()]


def bench(fn, xs, backward: bool = True) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians, the second nan when not backward; fn(*xs) returns the output."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*xs), return_mode="median")
    if not backward:
        return fwd, math.nan
    do = torch.randn_like(fn(*xs))

    def step():
        fn(*xs).backward(do)

    return fwd, do_bench(step, grad_to_none=xs, return_mode="median")


def sdpa_fn(B, T, H, N):
    q, k, v = (torch.randn(B, H, T, N, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn, [q, k, v]


def set_variant(name: str) -> dict:
    """Point the kernel modules at a tuning variant; returns the previous attribute values."""
    old = {}
    for mod in (wkv7_mod, wkv6_mod, walk_mod, common_mod):
        for key, val in VARIANTS[name].items():
            if hasattr(mod, key):
                old[(mod, key)] = getattr(mod, key)
                setattr(mod, key, val)
    return old


def fla_ops():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as err:
        print(f"fla unavailable: {err}")
        return {}
    return {
        "fla_rwkv7": lambda r, w, k, v, a, b: chunk_rwkv7(r, w, k, v, a, b, scale=1.0)[0],
        "fla_rwkv7_lb": lambda r, w, k, v, a, b: chunk_rwkv7(r, w, k, v, a, b, scale=1.0,
                                                            lower_bound=-math.exp(-0.5))[0],
        "fla_rwkv6": lambda r, k, v, w, u: chunk_rwkv6(r, k, v, w, u, scale=1.0)[0],
    }


WKV_KERNELS = {wkv7_mod: ("wkv7_fwd_kernel", "wkv7_bwd_kernel", "wkv7_bwd_state_kernel"),
               wkv6_mod: ("wkv6_fwd_kernel", "wkv6_bwd_kernel", "wkv6_bwd_state_kernel"),
               walk_mod: ("segment_scan_kernel",)}


def resource_report(kernels: dict | None = None, int_flags: tuple[str, ...] = ("BV",)) -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the kernels ({module: names},
    default our WKV ones); flags: their bool/str constexprs and the int ones named in int_flags."""
    rows = []
    for mod, names in (kernels or WKV_KERNELS).items():
        for name in names:
            for cache in getattr(getattr(mod, name), "device_caches", {}).values():
                for ck in (cache[0] if isinstance(cache, tuple) else cache).values():
                    md = ck.metadata
                    kernel = getattr(mod, name)
                    consts = {kernel.arg_names[k[0]] if isinstance(k, tuple) else str(k): v
                              for k, v in getattr(getattr(ck, "src", None), "constants", {}).items()}
                    flags = {k: v for k, v in consts.items() if isinstance(v, (bool, str)) or k in int_flags}
                    rows.append(dict(kernel=name, n_regs=getattr(ck, "n_regs", None),
                                     n_spills=getattr(ck, "n_spills", None),
                                     shared=getattr(md, "shared", None), num_warps=getattr(md, "num_warps", None),
                                     num_stages=getattr(md, "num_stages", None),
                                     flags=flags))
    return rows


def write_with_resources(out: dict, path: str, kernels: dict | None = None,
                         int_flags: tuple[str, ...] = ("BV",)) -> None:
    """Add resource_report(kernels, int_flags) to out as "resources", write out to path (JSON), print them."""
    try:  # diagnostics only: the compiled-kernel cache layout differs between Triton versions
        out["resources"] = resource_report(kernels, int_flags)
    except (AttributeError, KeyError, TypeError, IndexError) as err:
        out["resources"] = [f"unavailable: {err!r}"]
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    for row in out["resources"]:
        print(f"  {row}")


def floors(shape, bw) -> dict:
    """Bytes floor in ms (fwd, fwd+bwd): WKV-7 fwd reads r,w,k,v,a,b and writes o; its bwd reads those
    and do and writes 6 grads. WKV-6: 4 inputs (u is negligible), 1 output; bwd 5 reads, 4 grads."""
    numel = math.prod(shape)
    return {op: (f * numel * BF16 / bw * 1e3, (f + b) * numel * BF16 / bw * 1e3)
            for op, f, b in (("rwkv7", 7, 13), ("rwkv6", 5, 9))}


def jobs(shapes, variants, fla):
    """(name, shape, thunk giving (fn, inputs)) in priority order: our first variant, SDPA, fla's
    rwkv7, our other variants, fla's rwkv6 (fla autotunes for minutes on the first call of each)."""
    def ours(name):
        for shape in shapes:
            yield f"ours7_{name}", shape, lambda s=shape: (lambda *x: wkv7_mod.wkv7_triton(*x)[0], wkv7_inputs(*s))
            yield f"ours6_{name}", shape, lambda s=shape: (lambda *x: wkv6_mod.wkv6_triton(*x)[0], wkv6_inputs(*s))

    yield from ours(variants[0])
    for shape in shapes:
        yield "sdpa", shape, lambda s=shape: sdpa_fn(*s)
    def anchors(rwkv):
        for shape in shapes:
            for name, fn in fla.items():
                if rwkv in name:
                    make_inputs = wkv7_inputs if "rwkv7" in name else wkv6_inputs
                    yield name, shape, lambda s=shape, f=fn, m=make_inputs: (f, m(*s))

    yield from anchors("rwkv7")
    for name in variants[1:]:
        yield from ours(name)
    yield from anchors("rwkv6")


def table(out: dict) -> str:
    lines = []
    for key, res in out["results"].items():
        lines.append(f"\n(B,T,H,N)={key}  median ms, fwd / fwd+bwd")
        fla7 = [res[k] for k in ("fla_rwkv7", "fla_rwkv7_lb") if k in res]
        anchors = {"rwkv7": min(fla7, key=lambda t: t[1]) if fla7 else None, "rwkv6": res.get("fla_rwkv6")}
        for name, val in res.items():
            if name == "floor_ms":
                continue
            op = "rwkv6" if name.startswith(("ours6", "fla_rwkv6")) else "rwkv7"
            floor = res["floor_ms"][op]
            extra = f"  x floor {val[0] / floor[0]:.2f} / {val[1] / floor[1]:.2f}"
            if name.startswith("ours") and anchors[op]:
                extra += f"  fla/ours {anchors[op][0] / val[0]:.2f} / {anchors[op][1] / val[1]:.2f}"
            lines.append(f"  {name:16s} {val[0]:8.3f} / {val[1]:8.3f}{extra}")
        for op, (f, fb) in res["floor_ms"].items():
            lines.append(f"  floor_{op:10s} {f:8.3f} / {fb:8.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="wkv.json")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
    parser.add_argument("--budget_s", type=float, default=1e9, help="start no new measurement after this")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"--variants: unknown {name!r}; valid: {sorted(VARIANTS)}")
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    t_start = time.time()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
           "results": {str(s): {"floor_ms": floors(s, bw)} for s in shapes}}
    print(f"device {out['device']}, torch {out['torch']}, triton {out['triton']}, copy {bw / 1e9:.0f} GB/s", flush=True)
    for name, shape, make in jobs(shapes, variants, fla_ops()):
        if time.time() - t_start > args.budget_s:
            print(f"budget spent: skipping {name} {shape} and the rest", flush=True)
            break
        variant = name.split("_", 1)[1] if name.startswith("ours") else None
        old = set_variant(variant) if variant else {}
        t0 = time.time()
        try:  # one failing anchor (e.g. an fla version change) must not lose the other measurements
            out["results"][str(shape)][name] = bench(*make(), backward=variant not in INFERENCE_ONLY)
        except (RuntimeError, ValueError, AssertionError, TypeError) as err:
            print(f"{name} {shape} failed: {err!r}", flush=True)
            continue
        finally:
            for (mod, key), val in old.items():
                setattr(mod, key, val)
        print(f"{time.time() - t_start:6.0f}s {name} {shape}: {out['results'][str(shape)][name]} "
              f"({time.time() - t0:.0f} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    write_with_resources(out, args.out)
    print(table(out))


if __name__ == "__main__":
    main()
