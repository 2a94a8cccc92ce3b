#!/usr/bin/env bash
# GPU checks of distill-export and distill-eval, for one GPU: the gpu-marked export tests (the HF
# folder on our Triton kernels, fla's chunked kernels on a format=fla folder), then a debug=smoke
# run exported and reported with the CUDA context lengths (1k..32k). Everything lands under $OUT.
#   OUT=/tmp/out bash benchmarks/export_gpu.sh      (needs flash-linear-attention for the fla test)
set -u
OUT=${OUT:-outputs/export_gpu}
mkdir -p "$OUT"
status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests/distill/test_export.py tests/distill/test_export_native.py \
    > "$OUT/pytest_gpu.txt" 2>&1 || status=1
tail -n 5 "$OUT/pytest_gpu.txt"
python3 -m distill.train debug=smoke hydra.run.dir="$OUT/smoke" trainer.enable_progress_bar=false \
    '~callbacks.progress_bar' > "$OUT/train.txt" 2>&1 || status=1
python3 -m distill.export ckpt="$OUT/smoke/checkpoints/last.ckpt" out="$OUT/export" \
    hydra.run.dir="$OUT/export_hydra" > "$OUT/export.txt" 2>&1 || status=1
# held-out text: a stdlib module the quickstart teacher's training split leaves out is not needed here;
# any text serves for the decode-cost curves, and the NLL is the teacher's and student's on it
cp "$(python3 -c "import json, os; print(os.path.join(os.path.dirname(json.__file__), 'decoder.py'))")" "$OUT/held_out.txt"
python3 -m distill.evaluate ckpt="$OUT/export" text="$OUT/held_out.txt" hydra.run.dir="$OUT/report" \
    > "$OUT/eval.txt" 2>&1 || status=1
tail -n 20 "$OUT/eval.txt"
rm -rf "$OUT/export"/*.safetensors  # the weights are not needed back; the report is
exit $status
