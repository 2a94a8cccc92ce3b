#!/usr/bin/env bash
# One GPU session, possibly over several calls to a machine that stays warm between them: install the
# carried wheels, then run the named steps, each under its own time limit, logging to $OUT (files come
# back from there). Run from the repo root on the GPU machine:
#   bash benchmarks/gpu_session.sh STEP[:SECONDS] ...
# Carried beside the checkout (all ignored by git): .whl/**/*.whl, the wheels the GPU image lacks (hydra-core,
# omegaconf, antlr4, deepspeed + hjson/pydantic, fla, liger, gguf, torchao, bitsandbytes; the device tool's
# README says how to download them), .assets (the shared test text, DISTILL_ASSETS), .gguf/part* (the SmolLM2
# GGUF split in parts under the per-call size limit, one part per call). Wheels are installed into their own
# /tmp/site-N and every part and asset is copied to /tmp, so later calls on the same warm machine find them.
# Steps:
#   gpu_tests        every gpu-marked test but bitsandbytes' (tests_bnb: those, once its wheel is here)
#   throughput       0.5B shape, seq 512, teacher anchor; throughput_fla: with fla's RWKV7 anchor too;
#   throughput_big   the 1.5B shape at seq 512 and 2048 and the 0.5B shape at seq 2048, teacher anchor
#   job              the whole distill-train job, 70 steps a stage (its checkpoint stays in /tmp/job)
#   edge_job         benchmarks/edge.py --device cuda on the job's 0.5B-shaped student
#   smollm2          join the GGUF parts, write the plain HF folder (jobs/fetch_smollm2.py --gguf)
#   quality          benchmarks/quality.py --preset gpu --resume (results in /tmp/quality-out, checkpoints in
#                    /tmp/quality-work: a quality step in a later call on the same machine runs only what is left)
#   edge_smollm2     benchmarks/edge.py --device cuda on the quality run's SmolLM2 student
#   kl, wkv, export  the fused KL's gpu tests and kl_memory.py; benchmarks/wkv.py at the two training
#                    shapes; benchmarks/export_gpu.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/gguf
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
wheels=$(find .whl -type f -name '*.whl' 2>/dev/null)
if [ -n "$wheels" ]; then
    site=/tmp/site-$(ls -d /tmp/site-* 2>/dev/null | wc -l)
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels || exit 1
    rm -rf .whl  # installed: a later call on this machine installs only what it carries
fi
PYTHONPATH=$(ls -d /tmp/site-* 2>/dev/null | tr '\n' ':')$PWD
[ -d .gguf ] && cp .gguf/part* /tmp/gguf/ && rm -rf .gguf
[ -d .assets ] && rm -rf /tmp/assets && cp -r .assets /tmp/assets
export PYTHONPATH DISTILL_ASSETS=/tmp/assets DISTILL_CACHE=/tmp/cache PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
ckpt_of() { ls -t "$1"/checkpoints/stage*-*.ckpt 2>/dev/null | head -1; }
export -f ckpt_of  # the steps' commands run in their own bash
for spec in "$@"; do
    step=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
    echo "=== $step (limit ${limit}s) $(date -u +%H:%M:%S)"
    case $step in
        gpu_tests) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider -k 'not bitsandbytes' tests" ;;
        tests_bnb) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider -k bitsandbytes tests" ;;
        throughput) cmd="python3 benchmarks/throughput.py --out $OUT/throughput.json --shapes 0.5b --seqs 512 --anchors teacher --steps 10" ;;
        throughput_fla) cmd="python3 benchmarks/throughput.py --out $OUT/throughput_fla.json --shapes 0.5b --seqs 512 --anchors teacher,fla --steps 10" ;;
        throughput_big) cmd="python3 benchmarks/throughput.py --out $OUT/throughput_1.5b.json --shapes 1.5b --seqs 512,2048 --anchors teacher --steps 10 \
            && python3 benchmarks/throughput.py --out $OUT/throughput_0.5b_2048.json --shapes 0.5b --seqs 2048 --anchors teacher --steps 10" ;;
        job) cmd="python3 benchmarks/throughput.py --out $OUT/job.json --shapes 0.5b --job-only --job /tmp/job --job-steps 70" ;;  # its log: copied after the step, also when the limit stops it
        edge_job) cmd="python3 benchmarks/edge.py --ckpt \$(ckpt_of /tmp/job/job) --text stdlib --eval-tokens 65536 \
            --seq-len 512 --device cuda --out /tmp/edge-job && cp /tmp/edge-job/edge.json $OUT/edge_job.json" ;;
        smollm2) cmd="cat /tmp/gguf/part* > /tmp/smollm2.gguf && python3 jobs/fetch_smollm2.py --gguf /tmp/smollm2.gguf" ;;
        # a fresh machine resumes from the committed GPU report: only the runs it lacks are trained
        quality) mkdir -p /tmp/quality-out && [ -f /tmp/quality-out/quality.json ] || cp docs/results/gpu/quality.json /tmp/quality-out/
            cmd="python3 benchmarks/quality.py --preset gpu --jobs 2 --resume --out /tmp/quality-out --work /tmp/quality-work; \
            cp -r /tmp/quality-out $OUT/quality" ;;
        edge_smollm2) cmd="python3 benchmarks/edge.py --ckpt \$(ckpt_of /tmp/quality-work/runs/smollm2.rad_rwkv7) \
            --text /tmp/assets/text/tinyshakespeare.txt --eval-tokens 65536 --seq-len 512 --prompt 'The capital of France is' \
            --device cuda --out /tmp/edge-smollm2 && cp /tmp/edge-smollm2/edge.json $OUT/edge_smollm2.json" ;;
        kl) cmd="python3 -m pytest -q -m gpu -p no:cacheprovider -k 'kl' tests && python3 benchmarks/kl_memory.py --out $OUT/kl_memory.json --variants default,bv64_s4,s2" ;;
        export) cmd="OUT=$OUT/export bash benchmarks/export_gpu.sh" ;;
        wkv) cmd="python3 benchmarks/wkv.py --out $OUT/wkv.json --shapes 16x512x14x64,32x512x16x64 --budget_s $((limit - 60))" ;;
        *) echo "unknown step $step"; continue ;;
    esac
    timeout "$limit" bash -c "$cmd" 2>&1 | tee "$OUT/$step.log" | tail -n 40
    echo "=== $step: exit ${PIPESTATUS[0]} $(date -u +%H:%M:%S)"
    # a job cut off by its limit still shows how far it got
    [ "$step" = job ] && cp /tmp/job/job.log /tmp/job/job/logs/metrics.csv "$OUT/" 2>/dev/null
done
# At most 8 files come back from $OUT: everything small goes back as one archive (no weights, no checkpoints)
(cd "$OUT" && tar czf /tmp/session.tgz --exclude='*.safetensors' --exclude='*.ckpt' --exclude=checkpoints \
    --exclude=cache --exclude='*.pth' --exclude='*.onnx' . && rm -rf "${OUT:?}"/* && mv /tmp/session.tgz "$OUT/")
ls -la "$OUT"
