"""Triton model repository rendering ("config as data"): contracts -> config.pbtxt + backend glue.

Targets:
  cpu  every ONNX model runs in the Python-backend runner (model_repository/onnx_runner.py) on
       KIND_CPU: works with the embedded tritonserver of the nvidia-pytriton wheel.
  gpu  native `onnxruntime_onnx` on KIND_GPU (NGC Triton container) with ONNX Runtime's TensorRT
       execution provider (FP32 or FP16 with LayerNorm kept in FP32), explicit TensorRT
       optimisation profiles, engine/timing caches, dynamic batching and warm-up (`GpuOptions`).
The pipeline is a Python BLS model (model_repository/pipeline.py + selection.py + bls.py) in both targets.
ONNX files are written separately by the exporters into ``DIR/<name>/1/model.onnx``.
"""

from __future__ import annotations

import importlib.resources
import shutil
from dataclasses import dataclass
from pathlib import Path

from cellsam_triton import contracts
from cellsam_triton.contracts import DECODER_MAX_BOXES, MAX_PROMPT_POINTS, Family, ModelSpec, Tensor
from cellsam_triton.errors import UserError

# The glue ships inside the package (cellsam_triton.model_repository = model_repository/), so
# editable and regular installs (the Docker image) find it the same way.
GLUE_DIR = Path(str(importlib.resources.files("cellsam_triton.model_repository")))
RUNNER_GLUE = ("onnx_runner.py",)
# first file becomes model.py; contracts.py is the package's own (cellsam_triton/contracts.py)
PIPELINE_GLUE = ("pipeline.py", "box_pipeline.py", "selection.py", "roi_windows.py", "bls.py", "request_checks.py", "contracts.py")
ONNX_FILE = "model.onnx"
ROLES = ("encoder", "detector", "decoder", "roi_decoder", "point_decoder", "roi_point_decoder", "pipeline", "labels")
# `<family>_labels` instances (Python BLS on KIND_CPU, export/labels_repository.py): two images
# segmented at once overlap one's rule code (numpy) with the other's pipeline work, as the CLI's two
# workers per server do; on the gpu target as many as the pipeline has, to keep the encoder batching.
LABELS_INSTANCES = {"cpu": 2, "gpu": None}
MAX_QUEUE_DELAY_US = 2000
# cpu target: one pipeline request at a time through the networks, whose ONNX Runtime threads
# sleep as soon as they are idle. Two overlapping requests (2 instances) and spinning threads made
# every model share the cores with another one: measured on 12 val images (2 cores, `make
# bench-default --limit 12`), encoder 793 -> 745 ms per tile (raw ONNX Runtime 721), detector
# 0.115 -> 0.071 s and ROI decoder 0.46 -> 0.25 s per image. The client still overlaps its own
# work with the server's (requests queue at the pipeline).
PIPELINE_INSTANCES = 1
CPU_SPINNING = "0"  # ONNX Runtime "session.intra_op.allow_spinning" of the cpu runners
# cpu runners of batched models run each sample alone: outputs do not depend on the dynamic batch
# (repeatable labels under any load); batching bought no speed on CPU (README, Operations: Repeatable outputs)
CPU_SAMPLE_WISE = "1"

# --- gpu target ---------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16")
DEFAULT_TRT_CACHE = "/var/cache/cellsam-triton/trt"
GPU_QUEUE_DELAY_US = 5000  # a ViT-B batch of 8 takes tens of ms: waiting 5 ms to fill it pays
TRT_WORKSPACE_BYTES = 4 << 30
# DECODER_MAX_BOXES (contracts): the most boxes / point prompts of one decoder call (TensorRT
# profile max); MAX_PROMPT_POINTS (contracts): the point decoder's longest point axis.
# Instances per role on the GPU: the encoder and detector scale by dynamic batching (one
# instance, big batches); the decoder is small and latency-bound, so two instances let two
# pipeline requests decode at once. The pipeline (Python BLS on CPU) needs as many instances as
# requests in flight, or the encoder's batcher never sees a full batch: encoder_batch of them.
GPU_INSTANCES = {"encoder": 1, "detector": 1, "decoder": 2, "roi_decoder": 2, "point_decoder": 2, "roi_point_decoder": 2}


@dataclass(frozen=True)
class GpuOptions:
    """TensorRT settings of the gpu target (see README, "GPU deployment")."""

    precision: str = "fp32"
    trt_cache: str = DEFAULT_TRT_CACHE
    workspace_bytes: int = TRT_WORKSPACE_BYTES

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")


# --- config building blocks (model_config_pb2 messages, rendered by text_format) ------------------
def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _add_tensors(repeated, tensors: tuple[Tensor, ...]) -> None:
    pb = _pb()
    for t in tensors:
        entry = repeated.add(name=t.name, data_type=pb.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims))
        if t.optional:
            entry.optional = True


def _add_parameters(config, params: dict[str, object]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def _add_instances(config, kind: str, count: int = 1) -> None:
    config.instance_group.add(kind=_pb().ModelInstanceGroup.Kind.Value(kind), count=count)


def _set_dynamic_batching(config, spec: ModelSpec, delay_us: int = MAX_QUEUE_DELAY_US, preferred: tuple[int, ...] = ()) -> None:
    if spec.max_batch_size <= 0:
        return
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.dynamic_batching.preferred_batch_size.extend(preferred)


def _concrete_dims(tensor: Tensor, boxes: int, window: int = 0) -> tuple[int, ...]:
    """The tensor's dims with every dynamic axis made concrete: ``boxes`` for the leading (box)
    axis, ``window`` for the others (the ROI decoder's window side)."""
    return tuple((boxes if i == 0 else window) if d < 0 else d for i, d in enumerate(tensor.dims))


def _profile_shape(spec: ModelSpec, batch: int, boxes: int, window: int = 0) -> str:
    """TensorRT profile string "name:AxBxC,..." of every input (batch axis first when batched)."""
    shapes = []
    for t in spec.inputs:
        dims = ((batch,) if spec.max_batch_size > 0 else ()) + _concrete_dims(t, boxes, window)
        shapes.append(f"{t.name}:{'x'.join(map(str, dims))}")
    return ",".join(shapes)


def _add_warmup(config, spec: ModelSpec, batch_sizes: tuple[int, ...], boxes: int, window: int = 0) -> None:
    """`model_warmup`: one random-data request per batch size, so engines exist before traffic."""
    pb = _pb()
    for batch in batch_sizes:
        warmup = config.model_warmup.add(name=f"warmup_batch_{batch}", batch_size=batch)
        for t in spec.inputs:
            entry = warmup.inputs[t.name]
            entry.data_type = pb.DataType.Value(f"TYPE_{t.dtype}")
            entry.dims.extend(_concrete_dims(t, boxes, window))
            entry.random_data = True


# --- per-target runtime sections ---------------------------------------------------------------
def _cpu_runner(config, spec: ModelSpec, threads: int | None) -> None:
    """ONNX model on CPU: the Python-backend ONNX Runtime runner."""
    params = {"onnx_file": ONNX_FILE, "intra_op_threads": 0 if threads is None else threads, "inter_op_threads": 1,
              "allow_spinning": CPU_SPINNING}
    if spec.max_batch_size > 0:
        params["sample_wise"] = CPU_SAMPLE_WISE
    config.backend = "python"
    _add_instances(config, "KIND_CPU")
    _set_dynamic_batching(config, spec)
    _add_parameters(config, params)


def tensorrt_parameters(
    spec: ModelSpec, gpu: GpuOptions, decoder_chunk: int, windows: tuple[int, ...] = (0,)
) -> dict[str, str]:
    """Parameters of the "tensorrt" execution accelerator of Triton's onnxruntime backend.

    Key names are the backend's (precision_mode, max_workspace_size_bytes) or ONNX Runtime's
    TensorRT EP options it passes through (trt_*). Explicit profiles: batch 1..max_batch_size
    (optimised for the full batch) for encoder/detector, 1..DECODER_MAX_BOXES boxes (optimised
    for one pipeline chunk) for the decoders, window sides min..max of ``windows`` (optimised for
    the smallest) for the ROI decoder, and points a prompt 1..MAX_PROMPT_POINTS (optimised for one,
    the grid's) for the point decoder, so no engine is rebuilt under traffic.
    """
    small, large = min(windows), max(windows)
    if spec.max_batch_size > 0:
        low, opt, high = (_profile_shape(spec, b, 1) for b in (1, spec.max_batch_size, spec.max_batch_size))
    else:
        low, opt, high = (
            _profile_shape(spec, 1, n, w) for n, w in ((1, small), (decoder_chunk, small), (DECODER_MAX_BOXES, large))
        )
    params = {
        "precision_mode": gpu.precision.upper(),
        "max_workspace_size_bytes": str(gpu.workspace_bytes),
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": f"{gpu.trt_cache.rstrip('/')}/{spec.name}",
        "trt_timing_cache_enable": "true",
        "trt_timing_cache_path": gpu.trt_cache,
        "trt_profile_min_shapes": low,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": high,
    }
    if gpu.precision == "fp16":
        # ViT LayerNorms (ONNX LayerNormalization at opset 17) overflow in FP16: keep them FP32.
        params["trt_layer_norm_fp32_fallback"] = "true"
    return params


def _gpu_runner(config, spec: ModelSpec, role: str, gpu: GpuOptions, family: Family) -> None:
    """ONNX model on GPU: Triton's native onnxruntime backend with the TensorRT accelerator."""
    batched = spec.max_batch_size > 0
    preferred = tuple(sorted({max(1, spec.max_batch_size // 2), spec.max_batch_size})) if batched else ()
    warm = (1, spec.max_batch_size) if batched and spec.max_batch_size > 1 else (1,)
    windows = {"roi_decoder": tuple(family.roi_windows), "point_decoder": (1, MAX_PROMPT_POINTS),
               "roi_point_decoder": (family.grid.window,)}.get(role, (0,))
    config.platform = "onnxruntime_onnx"
    config.default_model_filename = ONNX_FILE
    _add_instances(config, "KIND_GPU", GPU_INSTANCES[role])
    _set_dynamic_batching(config, spec, GPU_QUEUE_DELAY_US, preferred)
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters.update(tensorrt_parameters(spec, gpu, family.decoder_chunk, windows))
    _add_warmup(config, spec, warm, family.decoder_chunk, min(windows))


def pipeline_parameters(family: Family) -> dict[str, object]:
    """What the BLS pipeline reads from its config: the family (names, thresholds, NMS, grid rules)."""
    return {"family": family.to_json()}


TARGETS = ("cpu", "gpu")


def render_config(
    spec: ModelSpec,
    target: str,
    role: str,
    threads: int | None = None,
    family: Family | None = None,
    gpu: GpuOptions | None = None,
) -> str:
    """The config.pbtxt text of one model (a ``model_config_pb2.ModelConfig`` in protobuf text
    format). ``role`` is one of ROLES; the pipeline, the labels model and the gpu target need ``family``;
    ``gpu`` (default `GpuOptions()`) applies to the gpu target only."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if role not in ROLES:
        raise UserError(f"unknown model role {role!r}; choose from {', '.join(ROLES)}")
    from google.protobuf import text_format

    config = _pb().ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    _add_tensors(config.input, spec.inputs)
    _add_tensors(config.output, spec.outputs)
    if role in ("pipeline", "labels"):
        if family is None:
            raise ValueError(f"the {role} config needs its family")
        pipeline_count = family.encoder_batch if target == "gpu" else PIPELINE_INSTANCES
        count = (LABELS_INSTANCES[target] or pipeline_count) if role == "labels" else pipeline_count
        config.backend = "python"
        _add_instances(config, "KIND_CPU", count)
        _add_parameters(config, pipeline_parameters(family))
    elif target == "cpu":
        _cpu_runner(config, spec, threads)
    else:
        if family is None:
            raise ValueError("the gpu target needs the model's family (decoder chunk, ROI windows)")
        _gpu_runner(config, spec, role, gpu or GpuOptions(), family)
    return text_format.MessageToString(config)


def family_roles(family: Family) -> list[tuple[str, ModelSpec]]:
    """(role, spec) of every model a family serves (the ROI decoder only with ``decoder_context`` roi)."""
    roi = [("roi_decoder", family.roi_decoder())] if family.decoder_context == "roi" else []
    base = [("encoder", family.encoder()), ("detector", family.detector_model()), ("decoder", family.decoder())]
    return base + roi + [("pipeline", family.pipeline())]


def _glue_files(role: str, spec: ModelSpec, family: Family, target: str) -> tuple[str, ...]:
    if role == "pipeline":
        return PIPELINE_GLUE
    return RUNNER_GLUE if target == "cpu" else ()


def glue_source(name: str) -> Path:
    """Where glue file ``name`` comes from: model_repository/, or the package for contracts.py."""
    return Path(contracts.__file__) if name == "contracts.py" else GLUE_DIR / name


def write_models(
    repo_dir: str | Path, roles: list[tuple[str, ModelSpec]], family: Family, target: str,
    threads: int | None = None, gpu: GpuOptions | None = None, glue_files=_glue_files,
) -> list[Path]:
    """Write the config.pbtxt and backend glue (``glue_files(role, spec, family, target)``) of each
    (role, spec) under ``repo_dir``; returns the written files."""
    repo_dir = Path(repo_dir)
    written: list[Path] = []
    for role, spec in roles:
        model_dir = repo_dir / spec.name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        config = model_dir / "config.pbtxt"
        config.write_text(render_config(spec, target, role, threads=threads, family=family, gpu=gpu))
        written.append(config)
        for i, glue in enumerate(glue_files(role, spec, family, target)):
            dest = model_dir / "1" / ("model.py" if i == 0 else glue)
            shutil.copyfile(glue_source(glue), dest)
            written.append(dest)
    return written


def write_family(
    repo_dir: str | Path, family: Family, target: str, threads: int | None = None, gpu: GpuOptions | None = None
) -> list[Path]:
    """Write every model's config.pbtxt and backend glue under ``repo_dir``; returns the written files."""
    return write_models(repo_dir, family_roles(family), family, target, threads, gpu)


def parse_config(path_or_text: str | Path):
    """Parse config.pbtxt (a path or the text) into `tritonclient.grpc.model_config_pb2.ModelConfig`."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = str(path_or_text)
    if isinstance(path_or_text, Path) or ("\n" not in text and Path(text).is_file()):
        text = Path(path_or_text).read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())
