#!/usr/bin/env bash
# Every GPU check of a session in one call on a lent H100/H200 (the `device` tool), from the repo
# root, with the missing wheels carried in .whl/ (diffusers, importlib_metadata, pydantic and its
# small dependencies; see docs/benchmarks.md). Writes logs and JSON under $OUT, most important
# first, so a run cut short still returns what finished.
#   BUDGET_S=540 the whole script's seconds (default: none). Each stage's timeout is its own cap or
#               what is left of the budget, whichever is smaller; a stage with under 40 s left is
#               skipped. So one device call runs as much as fits, most important first.
#   BATCH=128   per-GPU batch of the throughput bench and of the loop's XL/2 test (default 128:
#               the optimizer step's fixed cost spread over twice the images of batch 64)
#   VARIANTS=...  the bench's variants (default ref,lumos-bf16w)
#   BATCH2=256 VARIANTS2=...  a second bench at another batch (default: none; VARIANTS2 defaults
#               to lumos-bf16w), to train_throughput_b$BATCH2.json
#   LOOP_K=...  which loop tests run (pytest -k; default: resume, pinned batches, XL/2 i2i in
#               both precisions and XL/2 t2i)
#   TRAIN=0 skips the bench; LOOP=0 skips the loop.
#   SAMPLING=1 also times sampling (measured: 59.4 ms on an H100, see docs/benchmarks.md);
#   WHEELS=0 skips the wheel install (a CPU dry run)
#   SIZE=tiny DEVICE=cpu  a CPU dry run of the benches: `WHEELS=0 SIZE=tiny DEVICE=cpu bash ...`
set -u
OUT=${OUT:-bench/results}
SIZE=${SIZE:-XL/2}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${BUDGET_S:-1000000}))
# stage CAP CMD...: runs CMD under `timeout min(CAP, what is left of the budget)`, or skips it.
stage() {
  local cap=$1 left=$((DEADLINE - SECONDS)); shift
  if [ "$left" -lt 40 ]; then echo "skipped (budget spent, ${left}s left): $*"; return 0; fi
  [ "$left" -lt "$cap" ] && cap=$left
  timeout "$cap" "$@"
}
if [ "${WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
# Training throughput: the compiled reference vs this project's XL/2 (bf16 weights), compiled,
# with where each one's device time goes (--profile), to aim the next speed-up.
bench() {  # bench CAP BATCH VARIANTS JSON
  stage "$1" python3 bench/train_throughput.py --size "$SIZE" --device "$DEVICE" \
    --variants "$3" --batch "$2" --profile --steps "${STEPS:-15}" --warmup 3 --out "$OUT/$4.json" \
    2>&1 | tee "$OUT/$4.log"
}
if [ "${TRAIN:-1}" = 1 ]; then
  bench "${TRAIN_TIMEOUT:-300}" "$BATCH" "${VARIANTS:-ref,lumos-bf16w}" \
    train_throughput
  if [ -n "${BATCH2:-}" ]; then
    bench "${TRAIN_TIMEOUT:-300}" "$BATCH2" "${VARIANTS2:-lumos-bf16w}" \
      "train_throughput_b$BATCH2"
  fi
fi
# The training loop itself (lumos.training.train): its CUDA resume check, pinned batches, XL/2 at
# 256 px compiled in "bf16" and "bf16-weights", and the T2I step (120 T5-XXL tokens). It imports
# the whole library (pydantic and its dependencies in .whl/).
if [ "${LOOP:-1}" = 1 ]; then
  LUMOS_GPU_BATCH=$BATCH PYTHONPATH=${PYTHONPATH:-}:src stage "${LOOP_TIMEOUT:-320}" \
    python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/training/test_train_gpu.py \
    -k "${LOOP_K-resume or pinned or paper_size}" 2>&1 | tee "$OUT/train_loop.log"
fi
# Sampling latency of one 256 px image (target <= 60 ms). The device image's onnxruntime is the
# CPU build, and onnxruntime-gpu's wheel is larger than what a device call can carry: the ONNX
# path's GPU latency needs a cluster GPU node with the serving image.
if [ "${SAMPLING:-0}" = 1 ]; then
  PATHS=pytorch-eager,pytorch-compile
  [ "$DEVICE" = cuda ] && PATHS=$PATHS,pytorch-cudagraphs
  PYTHONPATH=${PYTHONPATH:-}:src stage "${SAMPLING_TIMEOUT:-140}" python3 \
    bench/sampling_latency.py --size "$SIZE" --device "$DEVICE" --paths "$PATHS" \
    --out "$OUT/sampling_latency.json" 2>&1 | tee "$OUT/sampling_latency.log"
fi
