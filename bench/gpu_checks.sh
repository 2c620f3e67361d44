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
timeout "${TRAIN_TIMEOUT:-280}" python3 bench/train_throughput.py \
  --variants "${VARIANTS:-ref,lumos-bf16w}" \
  --steps 20 --warmup 3 --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
