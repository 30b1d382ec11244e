"""Triton model repository rendering ("config as data"): contracts -> config.pbtxt + backend glue.

Targets:
  cpu  every ONNX model runs in the Python-backend runner (model_repository/onnx_runner.py) on
       KIND_CPU: works with the embedded tritonserver of the nvidia-pytriton wheel.
  gpu  native `onnxruntime_onnx` on KIND_GPU (NGC Triton container).
The pipeline is a Python BLS model (model_repository/pipeline.py + selection.py) in both targets.
ONNX files are written separately by the exporters into ``DIR/<name>/1/model.onnx``.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path
from typing import Callable

from cellsam_triton.contracts import Family, ModelSpec, Tensor
from cellsam_triton.errors import UserError

# The glue ships inside the package (cellsam_triton.model_repository = model_repository/), so
# editable and regular installs (the Docker image) find it the same way.
GLUE_DIR = Path(str(importlib.resources.files("cellsam_triton.model_repository")))
RUNNER_GLUE = ("onnx_runner.py",)
PIPELINE_GLUE = ("pipeline.py", "selection.py")
ONNX_FILE = "model.onnx"
ROLES = ("encoder", "detector", "decoder", "pipeline")
MAX_QUEUE_DELAY_US = 2000
DEFAULT_NMS_IOU = 0.5
DEFAULT_MAX_DETECTIONS = 1000
# Concurrent pipeline requests overlap (one in the decoder while the next is in the encoder),
# which also lets the encoder's dynamic batcher see more than one image at a time.
PIPELINE_INSTANCES = 2


# --- pbtxt building blocks ---------------------------------------------------------------------
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(t: Tensor) -> str:
    dims = ", ".join(str(d) for d in t.dims)
    optional = " optional: true" if t.optional else ""
    return f"  {{ name: {_quote(t.name)} data_type: TYPE_{t.dtype} dims: [ {dims} ]{optional} }}"


def _tensors(key: str, tensors: tuple[Tensor, ...]) -> str:
    return f"{key} [\n" + ",\n".join(_tensor(t) for t in tensors) + "\n]"


def _parameters(params: dict[str, object]) -> str:
    return "\n".join(
        f"parameters {{ key: {_quote(k)} value {{ string_value: {_quote(str(v))} }} }}" for k, v in params.items()
    )


def _instances(kind: str, count: int = 1) -> str:
    return f"instance_group [ {{ kind: {kind} count: {count} }} ]"


def _dynamic_batching(spec: ModelSpec) -> str:
    if spec.max_batch_size <= 0:
        return ""
    return f"dynamic_batching {{ max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}"


# --- per-target runtime sections ---------------------------------------------------------------
def _cpu_runner(spec: ModelSpec, threads: int | None) -> list[str]:
    """ONNX model on CPU: the Python-backend ONNX Runtime runner."""
    params = {"onnx_file": ONNX_FILE, "intra_op_threads": 0 if threads is None else threads, "inter_op_threads": 1}
    return ['backend: "python"', _instances("KIND_CPU"), _dynamic_batching(spec), _parameters(params)]


def _gpu_runner(spec: ModelSpec, threads: int | None) -> list[str]:
    """ONNX model on GPU: Triton's native onnxruntime backend (extend here: TensorRT accelerator)."""
    return [
        'platform: "onnxruntime_onnx"',
        f'default_model_filename: "{ONNX_FILE}"',
        _instances("KIND_GPU"),
        _dynamic_batching(spec),
    ]


RUNNERS: dict[str, Callable[[ModelSpec, int | None], list[str]]] = {"cpu": _cpu_runner, "gpu": _gpu_runner}


def pipeline_parameters(family: Family) -> dict[str, object]:
    """What the BLS pipeline reads from its config: the family and the detector post-processing."""
    return {
        "family": family.to_json(),
        "nms_iou": family.extra.get("nms_iou", DEFAULT_NMS_IOU),
        "max_detections": family.extra.get("max_detections", DEFAULT_MAX_DETECTIONS),
    }


def render_config(
    spec: ModelSpec, target: str, role: str, threads: int | None = None, family: Family | None = None
) -> str:
    """The config.pbtxt text of one model. ``role`` is one of ROLES; the pipeline needs ``family``."""
    if target not in RUNNERS:
        raise UserError(f"unknown target {target!r}; choose from {', '.join(RUNNERS)}")
    if role not in ROLES:
        raise UserError(f"unknown model role {role!r}; choose from {', '.join(ROLES)}")
    head = [f"name: {_quote(spec.name)}", f"max_batch_size: {spec.max_batch_size}"]
    if role == "pipeline":
        if family is None:
            raise ValueError("the pipeline config needs its family")
        body = ['backend: "python"', _instances("KIND_CPU", PIPELINE_INSTANCES), _parameters(pipeline_parameters(family))]
    else:
        body = RUNNERS[target](spec, threads)
    sections = head + [_tensors("input", spec.inputs), _tensors("output", spec.outputs)] + body
    return "\n".join(s for s in sections if s) + "\n"


def family_roles(family: Family) -> list[tuple[str, ModelSpec]]:
    """(role, spec) of every model a family serves."""
    return list(zip(ROLES, (family.encoder(), family.detector_model(), family.decoder(), family.pipeline())))


def _glue_files(role: str, target: str) -> tuple[str, ...]:
    if role == "pipeline":
        return PIPELINE_GLUE
    return RUNNER_GLUE if target == "cpu" else ()


def write_family(repo_dir: str | Path, family: Family, target: str, threads: int | None = None) -> list[Path]:
    """Write every model's config.pbtxt and backend glue under ``repo_dir``; returns the written files."""
    repo_dir = Path(repo_dir)
    written: list[Path] = []
    for role, spec in family_roles(family):
        model_dir = repo_dir / spec.name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        config = model_dir / "config.pbtxt"
        config.write_text(render_config(spec, target, role, threads=threads, family=family))
        written.append(config)
        for i, glue in enumerate(_glue_files(role, target)):
            dest = model_dir / "1" / ("model.py" if i == 0 else glue)
            shutil.copyfile(GLUE_DIR / glue, dest)
            written.append(dest)
    return written


def parse_config(path_or_text: str | Path):
    """Parse config.pbtxt (a path or the text) into `tritonclient.grpc.model_config_pb2.ModelConfig`."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = str(path_or_text)
    if isinstance(path_or_text, Path) or ("\n" not in text and Path(text).is_file()):
        text = Path(path_or_text).read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())
