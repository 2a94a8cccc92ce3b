"""Registers, spill stack and shared memory of our WKV kernels for an H100 (sm_90), without a GPU.

Compiles each kernel as the wrappers launch it (bf16 inputs, N = 64, the module's value block and
warps) with `triton.compile` for sm_90 and reads the cubin's resource usage with the cuobjdump that
ships in the triton wheel. Spills show up as STACK bytes. Use it before spending device time:

    python benchmarks/wkv_resources.py [--N 64]

Figures come from the local triton, which may differ from the GPU machine's version. SHARED is the
static part only; Triton's dynamic shared memory shows in benchmarks/wkv.py's report on the GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.wkv6_triton as wkv6
import kernels.wkv7_triton as wkv7
from kernels.wkv_triton_common import block_v, inverse_precision

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
HALF, F32, I32 = "*bf16", "*fp32", "*i32"


def resource_line(fn, pointers: dict[str, str], constexprs: dict, num_warps: int) -> str:
    """cuobjdump's REG/STACK/SHARED line for fn compiled with these argument types and constants."""
    scalars = {"scale": "fp32", "T": "i32", "NTOK": "i32"}
    signature = {name: pointers.get(name, scalars.get(name, "constexpr")) for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return next(line.strip() for line in out.splitlines() if "REG:" in line)


def pointer_types(fn, half: set[str]) -> dict[str, str]:
    """bf16 for the inputs/outputs named in half, int32 for the layouts, fp32 for states and gradients."""
    ints = {"cu_seqlens", "chunk_offsets", "seg_first"}
    return {name: HALF if name in half else I32 if name in ints else F32
            for name in fn.arg_names if name not in ("scale", "T", "NTOK") and name[0].islower()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=64)
    N = parser.parse_args().N
    BV = block_v(N)
    shape = dict(H=16, K=N, V=N, BT=16, BV=BV, PREC="tf32")
    shape7 = dict(shape, LOG2_BT=wkv7.BT.bit_length() - 1, INV_PREC=inverse_precision(torch.bfloat16))
    half7 = {"r", "w", "k", "v", "a", "b", "o", "do", "dv"}
    half6 = {"r", "k", "v", "w", "u", "o", "do", "dv"}
    fwd_flags = dict(USE_H0=False, STORE_HT=False, IS_VARLEN=False)
    infer7 = dict(shape7, BT=wkv7.INFER_BT, LOG2_BT=wkv7.INFER_BT.bit_length() - 1)
    maps = dict(fwd_flags, IS_VARLEN=True, STORE_HS=False, TRANSITION=True)
    runs = [
        ("wkv7 fwd (inference)", wkv7.wkv7_fwd_kernel, half7,
         dict(infer7, **fwd_flags, STORE_HS=False, TRANSITION=False, STORE_O=True), wkv7.INFER_WARPS),
        ("wkv7 fwd (inference maps)", wkv7.wkv7_fwd_kernel, half7, dict(infer7, **maps, STORE_O=True),
         wkv7.INFER_WARPS),
        ("wkv7 fwd (training)", wkv7.wkv7_fwd_kernel, half7,
         dict(shape7, **fwd_flags, STORE_HS=True, TRANSITION=False, STORE_O=True), wkv7.FWD_WARPS),
        ("wkv7 fwd (segment maps)", wkv7.wkv7_fwd_kernel, half7, dict(shape7, **maps, STORE_O=False),
         wkv7.FWD_WARPS),
        ("wkv7 bwd", wkv7.wkv7_bwd_kernel, half7,
         dict(shape7, USE_DHT=False, STORE_DH0=False, IS_VARLEN=False), wkv7.BWD_WARPS),
        ("wkv7 bwd_state", wkv7.wkv7_bwd_state_kernel, half7, dict(shape7), wkv7.FWD_WARPS),
        ("wkv6 fwd (inference)", wkv6.wkv6_fwd_kernel, half6,
         dict(shape, **fwd_flags, BT=wkv6.INFER_BT, STORE_HS=False, TRANSITION=False, STORE_O=True),
         wkv6.INFER_WARPS),
        ("wkv6 fwd (training)", wkv6.wkv6_fwd_kernel, half6,
         dict(shape, **fwd_flags, STORE_HS=True, TRANSITION=False, STORE_O=True), wkv6.FWD_WARPS),
        ("wkv6 bwd", wkv6.wkv6_bwd_kernel, half6,
         dict(shape, USE_DHT=False, STORE_DH0=False, IS_VARLEN=False), wkv6.BWD_WARPS),
    ]
    print(f"sm_90, triton {triton.__version__}, N = {N}, value block {BV}")
    for name, fn, half, constexprs, warps in runs:
        line = resource_line(fn, pointer_types(fn, half), constexprs, warps)
        print(f"{name:28s} {warps} warps  BV {constexprs['BV']:3d}  {line}")


if __name__ == "__main__":
    main()
