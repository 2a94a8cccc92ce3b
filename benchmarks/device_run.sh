#!/usr/bin/env bash
# One GPU session for issue 3: install the carried fla wheels (the anchor; never a runtime dependency),
# run every WKV Triton test on CUDA (gpu-marked full sizes included), then benchmarks/wkv.py.
# Usage (repo root, on the GPU machine; $OUT collects logs and JSON):
#   bash benchmarks/device_run.sh [bench variants, default bv32_w8] [bench budget in s, default 420] [pytest -k filter]
# Wheels, fetched beforehand where pip works (fla-core needs only einops, already on the GPU image):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# fla's first call autotunes for about 4 minutes: give the benchmark budget room for it.
set -o pipefail
OUT=${OUT:-/tmp/wkv-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider -k "${3:-wkv}" tests/kernels/test_wkv_triton.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -n 15
PYTHONUNBUFFERED=1 timeout $((${2:-420} + 120)) python3 benchmarks/wkv.py --out "$OUT/wkv.json" \
    --variants "${1:-bv32_w8}" --budget_s "${2:-420}" 2>&1 \
    | tee "$OUT/bench.log"
