# Production image: the project on NVIDIA's Triton container, native onnxruntime_onnx models with
# the TensorRT accelerator on GPU (see README, "GPU deployment").
#   docker build -t cellsam-triton .
#   GPU: docker run --gpus all --shm-size=2g -p 8000-8002:8000-8002 \
#          -v cellsam-models:/models -v cellsam-trt:/var/cache/cellsam-triton cellsam-triton
#   CPU: docker run --shm-size=2g -p 8000-8002:8000-8002 -e CELLSAM_TARGET=cpu \
#          -v cellsam-models-cpu:/models cellsam-triton
# Model choice at build time (--build-arg EXPORT_AT_BUILD=1 [--build-arg PRECISION=fp16]: the
# default model, whose weights ship with the project) or at first start (-e CELLSAM_MODEL=cellsam
# -e CELLSAM_CHECKPOINT=/ckpt/cellsam_general.pt -v /path/to/ckpts:/ckpt:ro).
ARG TRITON_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

ARG MODEL=default
ARG CHECKPOINT=
ARG TARGET=gpu
ARG PRECISION=fp32
ARG EXPORT_AT_BUILD=0
# Export runs on the CPU (PyTorch -> ONNX + an ONNX Runtime parity check): CPU wheels suffice.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
ARG ORT_SPEC="onnxruntime==1.20.1"

ENV CELLSAM_MODEL=${MODEL} \
    CELLSAM_CHECKPOINT=${CHECKPOINT} \
    CELLSAM_TARGET=${TARGET} \
    CELLSAM_PRECISION=${PRECISION} \
    CELLSAM_REPOSITORY=/models \
    CELLSAM_TRT_CACHE=/var/cache/cellsam-triton/trt \
    XDG_CACHE_HOME=/var/cache/cellsam-triton \
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
# The Python-backend models (pipeline BLS; ONNX runners on the cpu target) need numpy,
# scikit-learn and onnxruntime; export needs torch + onnx (+ onnxruntime for its parity check).
# hadolint ignore=DL3013
RUN python3 -m pip install "numpy==1.26.4" \
 && python3 -m pip install --index-url "${TORCH_INDEX}" ${TORCH_SPEC} \
 && python3 -m pip install ${ORT_SPEC} ".[export]" \
 && chmod +x /usr/local/bin/cellsam-entrypoint \
 && mkdir -p /models "${CELLSAM_TRT_CACHE}" \
 && chown -R triton-server:triton-server /models /var/cache/cellsam-triton

# triton-server is uid 1000 in the NGC image
USER 1000:1000
RUN if [ "${EXPORT_AT_BUILD}" = "1" ]; then cellsam-entrypoint export-only; fi

EXPOSE 8000 8001 8002
# start-period: a first start may export the model and build TensorRT engines (minutes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["/usr/local/bin/cellsam-entrypoint"]
