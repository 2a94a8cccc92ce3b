#!/usr/bin/env bash
# One GPU session for issue 12: install the carried wheels, then run the named steps, each under its own
# time limit, logging to $OUT (files come back from there). Run from the repo root on the GPU machine:
#   bash benchmarks/gpu_session.sh STEP[:SECONDS] ...
# Steps: throughput (0.5B shape, seq 512, teacher anchor; throughput_eager: the student without compile too), throughput_all (both shapes and
# seqs, both anchors), job (the whole distill-train job, 70 steps a stage), gpu_tests (every gpu-marked
# test), kl (the fused KL's gpu tests and benchmarks/kl_memory.py), wkv (benchmarks/wkv.py at the two
# training shapes), export (benchmarks/export_gpu.sh).
# Carried beside the checkout (carry: .whl .assets .triton-cache): .whl holds the wheels the GPU image lacks
# (hydra-core, omegaconf, antlr4, deepspeed + hjson/pydantic, fla, liger; README of the device tool says how
# to download them), .assets the test text (DISTILL_ASSETS), .triton-cache fla's autotune results if kept.
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export DISTILL_ASSETS=$PWD/.assets PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton-cache TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
for spec in "$@"; do
    step=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
    echo "=== $step (limit ${limit}s) $(date -u +%H:%M:%S)"
    case $step in
        throughput) cmd="python3 benchmarks/throughput.py --out $OUT/throughput.json --shapes 0.5b --seqs 512 --anchors teacher --steps 10" ;;
        throughput_fla) cmd="python3 benchmarks/throughput.py --out $OUT/throughput_fla.json --shapes 0.5b --seqs 512 --anchors teacher,fla --steps 10" ;;
        throughput_eager) cmd="python3 benchmarks/throughput.py --out $OUT/throughput_eager.json --shapes 0.5b --seqs 512 --eager-too --anchors teacher --steps 10" ;;
        throughput_all) cmd="python3 benchmarks/throughput.py --out $OUT/throughput_all.json --steps 10" ;;
        job) cmd="python3 benchmarks/throughput.py --out $OUT/job.json --shapes 0.5b --job-only --job $OUT/job --job-steps 70" ;;
        gpu_tests) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider -x tests" ;;
        strategies) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider tests/distill/test_strategies_gpu.py" ;;
        kl) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider -k 'kl' tests && python3 benchmarks/kl_memory.py --out $OUT/kl_memory.json --variants default,bv64_s4,s2" ;;
        export) cmd="OUT=$OUT/export bash benchmarks/export_gpu.sh" ;;
        wkv) cmd="python3 benchmarks/wkv.py --out $OUT/wkv.json --shapes 16x512x14x64,32x512x16x64 --budget_s $((limit - 60))" ;;
        *) echo "unknown step $step"; continue ;;
    esac
    timeout "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$step.log" | tail -n 40
    echo "=== $step: exit ${PIPESTATUS[0]} $(date -u +%H:%M:%S)"
done
# At most 8 files come back from $OUT: everything small goes back as one archive (no weights, no checkpoints)
(cd "$OUT" && tar czf /tmp/session.tgz --exclude='*.safetensors' --exclude='*.ckpt' --exclude=checkpoints \
    --exclude=cache --exclude='*.pth' . && rm -rf "${OUT:?}"/* && mv /tmp/session.tgz "$OUT/")
ls -la "$OUT"
