#!/usr/bin/env bash
# Container entry point: export the chosen model on first start (if the repository is empty),
# then run tritonserver with health, metrics and no model-control API.
set -euo pipefail
repo="${CELLSAM_REPOSITORY:-/models}"
model="${CELLSAM_MODEL:-default}"
target="${CELLSAM_TARGET:-gpu}"

if [ -z "$(ls -A "$repo" 2>/dev/null)" ]; then
  args=(export --model "$model" --repository "$repo" --target "$target")
  if [ -n "${CELLSAM_CHECKPOINT:-}" ]; then args+=(--checkpoint "$CELLSAM_CHECKPOINT"); fi
  echo "cellsam-entrypoint: exporting $model ($target) to $repo" >&2
  cellsam-triton "${args[@]}"
fi
[ "${1:-}" = "export-only" ] && exit 0

exec tritonserver \
  --model-repository="$repo" \
  --model-control-mode=none \
  --strict-readiness=true \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true --allow-gpu-metrics=true \
  --backend-config=python,shm-default-byte-size=67108864 \
  --backend-config=python,shm-growth-byte-size=67108864 \
  --exit-timeout-secs=30 \
  "$@"
