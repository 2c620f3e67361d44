#!/usr/bin/env bash
# Every GPU check of a session in one call on a lent H100/H200 (the `device` tool), from the repo
# root, with the missing wheels carried in .whl/ (diffusers, importlib_metadata, pydantic and its
# small dependencies; see docs/benchmarks.md). Writes logs and JSON under $OUT, most important
# first, so a run cut short still returns what finished.
#   BATCH=128   per-GPU batch of the throughput bench and of the loop's XL/2 test (default 128:
#               the optimizer step's fixed cost spread over twice the images of batch 64)
#   LOOP_K=...  which loop tests run (pytest -k; default: resume, pinned batches, XL/2 i2i in
#               both precisions and XL/2 t2i)
#   VARIANTS=...  the bench's variants (default ref,lumos-bf16w,lumos-bf16w-fusedopt: the
#               compiled one-pass optimizer step against torch's fused AdamW, not yet measured)
#   OPTIM=0 skips the optimizer step's own bench (bench/optimizer_step.py: the default step
#               against the compiled one-pass step, no model compile: about a minute)
#   TRAIN=0 skips the bench; LOOP=0 skips the loop. Together they may take OPTIM_TIMEOUT +
#   TRAIN_TIMEOUT + LOOP_TIMEOUT = 770 s, more than a device call's 600 s: run them as two
#   calls on the warm machine, `LOOP=0 bash bench/gpu_checks.sh`, then
#   `OPTIM=0 TRAIN=0 bash bench/gpu_checks.sh`.
#   SAMPLING=1 also times sampling (measured: 59.4 ms on an H100, see docs/benchmarks.md);
#   WHEELS=0 skips the wheel install (a CPU dry run)
#   SIZE=tiny DEVICE=cpu  a CPU dry run of the benches: `WHEELS=0 SIZE=tiny DEVICE=cpu bash ...`
set -u
OUT=${OUT:-bench/results}
SIZE=${SIZE:-XL/2}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-128}
mkdir -p "$OUT"
if [ "${WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
# The optimizer step alone (bf16 weights, fp32 masters, clipping): torch's fused AdamW between
# copies against the compiled one-pass step, and the latter's compile time.
if [ "${OPTIM:-1}" = 1 ]; then
  PYTHONPATH=${PYTHONPATH:-}:src timeout "${OPTIM_TIMEOUT:-150}" python3 bench/optimizer_step.py \
    --size "$SIZE" --device "$DEVICE" --out "$OUT/optimizer_step.json" 2>&1 \
    | tee "$OUT/optimizer_step.log"
fi
# Training throughput: the compiled reference vs this project's XL/2 (bf16 weights), compiled,
# with where each one's device time goes (--profile), to aim the next speed-up.
if [ "${TRAIN:-1}" = 1 ]; then
  timeout "${TRAIN_TIMEOUT:-300}" python3 bench/train_throughput.py --size "$SIZE" \
    --device "$DEVICE" --variants "${VARIANTS:-ref,lumos-bf16w,lumos-bf16w-fusedopt}" \
    --batch "$BATCH" --profile --steps "${STEPS:-15}" --warmup 3 \
    --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log"
fi
# The training loop itself (lumos.training.train): its CUDA resume check, pinned batches, XL/2 at
# 256 px compiled in "bf16" and "bf16-weights", and the T2I step (120 T5-XXL tokens). It imports
# the whole library (pydantic and its dependencies in .whl/).
if [ "${LOOP:-1}" = 1 ]; then
  LUMOS_GPU_BATCH=$BATCH PYTHONPATH=${PYTHONPATH:-}:src timeout "${LOOP_TIMEOUT:-320}" \
    python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/training/test_train_gpu.py \
    -k "${LOOP_K-resume or pinned or paper_size}" 2>&1 | tee "$OUT/train_loop.log"
fi
# Sampling latency of one 256 px image (target <= 60 ms). The device image's onnxruntime is the
# CPU build, and onnxruntime-gpu's wheel is larger than what a device call can carry: the ONNX
# path's GPU latency needs a cluster GPU node with the serving image.
if [ "${SAMPLING:-0}" = 1 ]; then
  PATHS=pytorch-eager,pytorch-compile
  [ "$DEVICE" = cuda ] && PATHS=$PATHS,pytorch-cudagraphs
  PYTHONPATH=${PYTHONPATH:-}:src timeout "${SAMPLING_TIMEOUT:-140}" python3 \
    bench/sampling_latency.py --size "$SIZE" --device "$DEVICE" --paths "$PATHS" \
    --out "$OUT/sampling_latency.json" 2>&1 | tee "$OUT/sampling_latency.log"
fi
