#!/usr/bin/env bash
# One GPU session for issue 3: install the carried fla wheels (the anchor; never a runtime dependency),
# run benchmarks/wkv.py, then the gpu-marked WKV Triton tests (full sizes; CI runs the small ones on the CPU).
# Usage (repo root, on the GPU machine; $OUT collects logs, JSON and fla's autotune results):
#   bash benchmarks/device_run.sh [bench variants, default "default"] [bench budget in s, default 300] [pytest -k filter, default triton; - skips the tests]
# Wheels, fetched beforehand where pip works (fla-core needs only einops, already on the GPU image):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# fla autotunes for minutes on its first call (H200: 3.3 min for chunk_rwkv7, 4.9 more with lower_bound;
# H100: 3.5 for chunk_rwkv6). Its results are cached under .triton-cache, which starts from
# benchmarks/fla_autotune_h100.tgz (made on an H100 with triton 3.6 and fla 0.6.0). Triton keys it by
# target, so an H200 (sm_90 too) uses it: retuned on an H200, fla took the same time (BENCHMARKS.md,
# session 7). Other Triton or fla versions and other targets miss it and autotune again. Each run packs the cache's results into
# $OUT/autotune.tgz: copy that over the tarball when they change.
set -o pipefail
OUT=${OUT:-/tmp/wkv-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TRITON_CACHE_DIR=$PWD/.triton-cache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
mkdir -p .triton-cache && tar xzf benchmarks/fla_autotune_h100.tgz -C .triton-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout $((${2:-300} + 150)) python3 benchmarks/wkv.py --out "$OUT/wkv.json" --variants "${1:-default}" \
    --budget_s "${2:-300}" 2>&1 | tee "$OUT/bench.log"
(cd .triton-cache && find . -name '*.autotune.json' | tar czf "$OUT/autotune.tgz" -T -)
[ "${3:-triton}" = - ] || timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider -k "${3:-triton}" tests/kernels/test_wkv_triton.py \
    tests/models 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 15
