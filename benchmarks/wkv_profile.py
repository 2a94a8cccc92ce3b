"""Where a WKV forward+backward spends its GPU time: device time per kernel, from torch.profiler.

Complements benchmarks/wkv.py (end-to-end medians): it names the pass that a tuning variant changed
(forward walk, dS walk, backward walk, segment scans, the gradient casts...). Same inputs and variants:

    python benchmarks/wkv_profile.py [--variants default,fwd_w8] [--shapes 8x4096x16x64] [--ops ours7,fla_rwkv7_lb]
                                     [--forward]

Prints, per (op, variant, shape), each kernel's mean device time per step in ms, largest first.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.wkv import VARIANTS, fla_ops, set_variant, wkv6_inputs, wkv7_inputs
import kernels.wkv6_triton as wkv6_mod
import kernels.wkv7_triton as wkv7_mod

STEPS = 10


def kernel_times(fn, xs, forward_only: bool = False, steps: int = STEPS) -> dict[str, float]:
    """Mean device ms per step of each kernel that fn's step launches: forward+backward, or the
    forward alone under no_grad (benchmarks/wkv.py's fwd column)."""
    do = torch.randn_like(fn(*xs))

    def step():
        if forward_only:
            with torch.no_grad():
                fn(*xs)
            return
        for x in xs:  # as do_bench's grad_to_none: no gradient-accumulation kernels in the profile
            x.grad = None
        fn(*xs).backward(do)

    for _ in range(3):  # compile and warm up outside the profile
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time / 1e3 / steps
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def ops() -> dict:
    ours = {"ours7": (lambda *x: wkv7_mod.wkv7_triton(*x)[0], wkv7_inputs),
            "ours6": (lambda *x: wkv6_mod.wkv6_triton(*x)[0], wkv6_inputs)}
    return {**ours, **{name: (fn, wkv7_inputs if "rwkv7" in name else wkv6_inputs) for name, fn in fla_ops().items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="default")
    parser.add_argument("--shapes", default="8x4096x16x64")
    parser.add_argument("--ops", default="ours7")
    parser.add_argument("--forward", action="store_true", help="profile the no_grad forward alone")
    args = parser.parse_args()
    available = ops()
    for name in args.ops.split(","):
        if name not in available:
            raise ValueError(f"--ops: unknown or unavailable {name!r}; valid here: {sorted(available)}")
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"--variants: unknown {name!r}; valid: {sorted(VARIANTS)}")
    torch.manual_seed(0)
    for shape in [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]:
        for op in args.ops.split(","):
            fn, make_inputs = available[op]
            for variant in args.variants.split(",") if op.startswith("ours") else ["-"]:
                old = set_variant(variant) if variant != "-" else {}
                try:
                    times = kernel_times(fn, make_inputs(*shape), args.forward)
                finally:
                    for (mod, key), val in old.items():
                        setattr(mod, key, val)
                step = "fwd" if args.forward else "fwd+bwd"
                print(f"\n{op} {variant} {shape}: {sum(times.values()):.3f} ms per {step} step (device)")
                for kernel, ms in times.items():
                    print(f"  {ms:8.3f}  {kernel[:100]}")


if __name__ == "__main__":
    main()
