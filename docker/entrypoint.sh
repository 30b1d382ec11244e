#!/usr/bin/env bash
# Container entry point: export the chosen model on first start (if the repository is empty),
# then run tritonserver with health, metrics and no model-control API.
# Environment: CELLSAM_MODEL, CELLSAM_CHECKPOINT, CELLSAM_TARGET (gpu|cpu), CELLSAM_PRECISION
# (fp32|fp16, gpu only), CELLSAM_REPOSITORY, CELLSAM_TRT_CACHE. Extra arguments go to tritonserver.
set -euo pipefail
repo="${CELLSAM_REPOSITORY:-/models}"
model="${CELLSAM_MODEL:-default}"
target="${CELLSAM_TARGET:-gpu}"
precision="${CELLSAM_PRECISION:-fp32}"
trt_cache="${CELLSAM_TRT_CACHE:-/var/cache/cellsam-triton/trt}"

if [ -z "$(ls -A "$repo" 2>/dev/null)" ]; then
  args=(export --model "$model" --repository "$repo" --target "$target" --precision "$precision" --trt-cache "$trt_cache")
  if [ -n "${CELLSAM_CHECKPOINT:-}" ]; then args+=(--checkpoint "$CELLSAM_CHECKPOINT"); fi
  echo "cellsam-entrypoint: exporting $model ($target, $precision) to $repo" >&2
  cellsam-triton "${args[@]}"
fi
[ "${1:-}" = "export-only" ] && exit 0
mkdir -p "$trt_cache"

# Python-backend shared memory: 64 MiB per model instance, growing in 64 MiB steps (a 1024^2
# FP32 image is 12 MiB; a chunk of 16 mask logits 4 MiB). Give the container --shm-size=2g.
exec tritonserver \
  --model-repository="$repo" \
  --model-control-mode=none \
  --strict-readiness=true \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true --allow-gpu-metrics=true --metrics-interval-ms=2000 \
  --backend-config=python,shm-default-byte-size=67108864 \
  --backend-config=python,shm-growth-byte-size=67108864 \
  --exit-timeout-secs=30 \
  "$@"
