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

# The tritonserver options are the ones `cellsam-triton serve` uses (one definition:
# cellsam_triton/server.py, tritonserver_args), here on all interfaces with GPU metrics, 64 MiB of
# Python-backend shared memory per model instance (a 1024^2 FP32 image is 12 MiB; give the
# container --shm-size=2g) and 30 s for in-flight requests on SIGTERM.
serve_args=(serve --repository "$repo" --host 0.0.0.0 --grpc-port 8001 --http-port 8000 --metrics-port 8002
            --exit-timeout 30 --shm-mib 64 --print-args)
if [ "$target" = "gpu" ]; then serve_args+=(--gpu-metrics); fi
mapfile -t triton_args < <(cellsam-triton "${serve_args[@]}")
[ "${#triton_args[@]}" -gt 0 ] || { echo "cellsam-entrypoint: no tritonserver options" >&2; exit 1; }
exec tritonserver "${triton_args[@]}" --metrics-interval-ms=2000 "$@"
