#!/usr/bin/env bash
# Every GPU check of a session in one call on a lent H100/H200 (the `device` tool), from the repo
# root, with the missing wheels carried in .whl/ (diffusers, importlib_metadata; see
# docs/benchmarks.md). Writes logs and JSON under $OUT; prints the tables last.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
# Training throughput: the compiled reference vs this project's XL/2 (bf16 weights), compiled.
# BATCH=128 measures both at twice the per-GPU batch: the optimizer step's fixed cost is then
# spread over twice the images (not measured yet).
timeout "${TRAIN_TIMEOUT:-280}" python3 bench/train_throughput.py \
  --variants "${VARIANTS:-ref,lumos-bf16w}" --batch "${BATCH:-64}" \
  --steps 20 --warmup 3 --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
# The training loop itself (lumos.training.train) at XL/2, batch 64, compiled, in both precisions
# ("bf16" autocast and "bf16-weights"), plus its CUDA resume check. It imports the whole library:
# besides the wheels above it needs pydantic, pydantic-core, minio and their small dependencies
# in .whl/ (docs/benchmarks.md lists them). LOOP=0 skips it.
if [ "${LOOP:-1}" = 1 ]; then
  PYTHONPATH=/tmp/site:src timeout "${LOOP_TIMEOUT:-300}" python3 -m pytest -m gpu -s -q \
    -p no:cacheprovider tests/training/test_train_gpu.py 2>&1 | tee "$OUT/train_loop.log"
fi
# Sampling latency of one 256 px image at XL/2 (target <= 60 ms). The device image's onnxruntime
# is the CPU build, and onnxruntime-gpu's wheel is larger than what a device call can carry: the
# ONNX path's GPU latency needs a cluster GPU node with the serving image. SAMPLING=0 skips it.
if [ "${SAMPLING:-1}" = 1 ]; then
  PYTHONPATH=/tmp/site:src timeout "${SAMPLING_TIMEOUT:-240}" python3 bench/sampling_latency.py \
    --size XL/2 --resolution 256 --device cuda --paths pytorch-eager,pytorch-compile,pytorch-cudagraphs \
    --out "$OUT/sampling_latency.json" 2>&1 | tee "$OUT/sampling_latency.log"
fi
