"""Repository rendering: every config parses as Triton's ModelConfig and says what the contract says."""

from __future__ import annotations

import json

import pytest
from tiny_family import tiny_family

from cellsam_triton.contracts import FAMILIES, Family
from cellsam_triton.errors import UserError
from cellsam_triton.export.repository import family_roles, parse_config, render_config, write_family

ALL_FAMILIES = [*FAMILIES.values(), tiny_family("cellfinder"), tiny_family("cellfinder_lite")]
TYPE_NAMES = {"FP32": 11, "FP16": 10, "INT32": 8, "INT64": 9, "UINT8": 2}  # ModelConfig DataType enum


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("family", ALL_FAMILIES, ids=lambda f: f.name)
def test_every_config_parses_and_matches_its_contract(family: Family, target: str) -> None:
    for role, spec in family_roles(family):
        config = parse_config(render_config(spec, target, role, threads=2, family=family))
        assert config.name == spec.name
        assert config.max_batch_size == spec.max_batch_size
        for rendered, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in rendered] == [t.name for t in tensors]
            for got, want in zip(rendered, tensors):
                assert list(got.dims) == list(want.dims)
                assert got.data_type == TYPE_NAMES[want.dtype]
                assert getattr(got, "optional", False) == want.optional
        native_gpu = target == "gpu" and role != "pipeline"
        assert config.backend == ("" if native_gpu else "python")
        assert config.platform == ("onnxruntime_onnx" if native_gpu else "")
        assert config.instance_group[0].kind == (config.instance_group[0].KIND_GPU if native_gpu else config.instance_group[0].KIND_CPU)
        assert config.HasField("dynamic_batching") == (spec.max_batch_size > 0 and role != "pipeline")
        if role == "pipeline":
            assert Family.from_json(config.parameters["family"].string_value) == family
        elif target == "cpu":
            assert config.parameters["onnx_file"].string_value == "model.onnx"
            assert config.parameters["intra_op_threads"].string_value == "2"
        else:
            assert config.default_model_filename == "model.onnx"


def test_pipeline_optional_inputs_are_marked() -> None:
    family = FAMILIES["cellsam"]
    config = parse_config(render_config(family.pipeline(), "cpu", "pipeline", family=family))
    optional = {t.name for t in config.input if t.optional}
    assert optional == {"detector_image", "boxes", "bbox_threshold", "iou_threshold"}


def test_family_extra_reaches_the_pipeline_parameters() -> None:
    family = tiny_family("cellfinder_lite")
    config = parse_config(render_config(family.pipeline(), "cpu", "pipeline", family=family))
    assert float(config.parameters["nms_iou"].string_value) == family.extra["nms_iou"]
    assert int(config.parameters["max_detections"].string_value) == family.extra["max_detections"]
    assert json.loads(config.parameters["family"].string_value)["extra"] == family.extra


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_write_family_lays_out_configs_and_glue(tmp_path, target: str) -> None:
    family = FAMILIES["cellsam_lite"]
    written = write_family(tmp_path, family, target)
    assert all(p.is_file() for p in written)
    for spec in family.models():
        assert parse_config(tmp_path / spec.name / "config.pbtxt").name == spec.name
    pipeline_dir = tmp_path / family.pipeline_name / "1"
    assert (pipeline_dir / "model.py").read_text().startswith('"""Triton Python BLS model')
    assert (pipeline_dir / "selection.py").is_file()
    runner = tmp_path / family.encoder_name / "1" / "model.py"
    assert runner.is_file() == (target == "cpu")
    assert not list(tmp_path.rglob("*.onnx"))  # exporters write those


def test_unknown_target_and_role_are_one_line_errors() -> None:
    spec = FAMILIES["cellsam"].encoder()
    with pytest.raises(UserError, match="unknown target"):
        render_config(spec, "tpu", "encoder")
    with pytest.raises(UserError, match="unknown model role"):
        render_config(spec, "cpu", "tokenizer")
