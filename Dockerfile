# GPU production image: the project on NVIDIA's Triton container, native onnxruntime_onnx models.
#   docker build -t cellsam-triton .
#   docker run --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 cellsam-triton
# Model choice at build time (--build-arg MODEL=cellsam --build-arg CHECKPOINT=/ckpt/cellsam_general.pt)
# or at first start (-e CELLSAM_MODEL=... -e CELLSAM_CHECKPOINT=... with the file mounted).
ARG TRITON_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

ARG MODEL=default
ARG CHECKPOINT=
ARG TARGET=gpu
ARG EXPORT_AT_BUILD=0
ARG TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"

ENV CELLSAM_MODEL=${MODEL} \
    CELLSAM_CHECKPOINT=${CHECKPOINT} \
    CELLSAM_TARGET=${TARGET} \
    CELLSAM_REPOSITORY=/models \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/cellsam-triton
COPY pyproject.toml README.md ./
COPY cellsam_triton ./cellsam_triton
COPY client ./client
COPY export ./export
COPY model_repository ./model_repository
COPY docker/entrypoint.sh /usr/local/bin/cellsam-entrypoint

# numpy<2: Triton's Python backend returns empty outputs with numpy 2 (see README, Operations).
# The Python-backend models (pipeline BLS) need numpy + scikit-learn; export needs torch + onnx.
# The project itself is installed from this folder; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install "numpy==1.26.4" ${TORCH_SPEC} \
 && python3 -m pip install ".[export]" \
 && chmod +x /usr/local/bin/cellsam-entrypoint

RUN if [ "${EXPORT_AT_BUILD}" = "1" ]; then cellsam-entrypoint export-only; fi

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["/usr/local/bin/cellsam-entrypoint"]
