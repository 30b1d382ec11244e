"""Repository rendering: every config parses as Triton's ModelConfig and says what the contract says."""

from __future__ import annotations

import json

import pytest
from tiny_family import tiny_family

from cellsam_triton.contracts import FAMILIES, Family
from cellsam_triton.errors import UserError
from cellsam_triton.export.repository import (
    DECODER_MAX_BOXES,
    GPU_INSTANCES,
    PRECISIONS,
    GpuOptions,
    family_roles,
    parse_config,
    render_config,
    write_family,
)

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
            assert ("sample_wise" in config.parameters) == (spec.max_batch_size > 0)  # batched: one sample a call
        else:
            assert config.default_model_filename == "model.onnx"


def test_pipeline_optional_inputs_are_marked() -> None:
    family = FAMILIES["cellsam"]
    config = parse_config(render_config(family.pipeline(), "cpu", "pipeline", family=family))
    optional = {t.name for t in config.input if t.optional}
    assert optional == {"detector_image", "boxes", "core", "bbox_threshold", "iou_threshold"}


def test_family_settings_reach_the_pipeline_config() -> None:
    family = tiny_family("cellfinder_lite")
    config = parse_config(render_config(family.pipeline(), "cpu", "pipeline", family=family))
    served = json.loads(config.parameters["family"].string_value)
    assert served["nms_iou"] == family.nms_iou and served["max_detections"] == family.max_detections == 100
    assert Family.from_json(config.parameters["family"].string_value) == family  # the typed family, whole


def test_family_json_of_older_exports_still_reads() -> None:
    """Repositories exported before the typed fields carry an untyped ``extra`` dict."""
    legacy = {"name": "old", "input_size": 256, "detector": "cellfinder_lite",
              "extra": {"nms_iou": 0.3, "tile_overlap": 32, "auto_scale_min_factor": 1.5, "points_per_side": 16, "unknown": 1}}
    family = Family.from_json(json.dumps(legacy))
    assert (family.nms_iou, family.tile_overlap, family.auto_scale_min_factor) == (0.3, 32, 1.5)
    assert family.grid.points_per_side == 16 and family.grid.pred_iou_threshold == 0.8
    assert Family.from_json(family.to_json()) == family


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_write_family_lays_out_configs_and_glue(tmp_path, target: str) -> None:
    family = FAMILIES["cellsam_lite"]
    written = write_family(tmp_path, family, target)
    assert all(p.is_file() for p in written)
    for spec in family.models():
        assert parse_config(tmp_path / spec.name / "config.pbtxt").name == spec.name
    pipeline_dir = tmp_path / family.pipeline_name / "1"
    assert (pipeline_dir / "model.py").read_text().startswith('"""Triton Python BLS model')
    assert (pipeline_dir / "selection.py").is_file() and (pipeline_dir / "contracts.py").is_file()
    runner = tmp_path / family.encoder_name / "1" / "model.py"
    assert runner.is_file() == (target == "cpu")
    assert not list(tmp_path.rglob("*.onnx"))  # exporters write those


def test_unknown_target_and_role_are_one_line_errors() -> None:
    spec = FAMILIES["cellsam"].encoder()
    with pytest.raises(UserError, match="unknown target"):
        render_config(spec, "tpu", "encoder")
    with pytest.raises(UserError, match="unknown model role"):
        render_config(spec, "cpu", "tokenizer")


# --- gpu target: TensorRT accelerator, batching, instances, warm-up --------------------------------
def _trt(config) -> dict[str, str]:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    return dict(accelerator.parameters)


def _profile(text: str) -> dict[str, list[int]]:
    """"a:1x2,b:3x4" -> {"a": [1, 2], "b": [3, 4]}"""
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.split(":") for item in text.split(","))}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ALL_FAMILIES, ids=lambda f: f.name)
def test_gpu_configs_carry_tensorrt_batching_and_warmup(family: Family, precision: str) -> None:
    gpu = GpuOptions(precision=precision, trt_cache="/cache/trt")
    for role, spec in family_roles(family):
        config = parse_config(render_config(spec, "gpu", role, family=family, gpu=gpu))
        if role == "pipeline":
            assert config.instance_group[0].count == family.encoder_batch  # enough requests in flight to fill a batch
            assert not config.HasField("optimization") and not config.model_warmup
            continue
        assert config.instance_group[0].count == GPU_INSTANCES[role]
        params = _trt(config)
        assert params["precision_mode"] == precision.upper()
        assert params["trt_engine_cache_enable"] == "true" and params["trt_engine_cache_path"] == f"/cache/trt/{spec.name}"
        assert params["trt_timing_cache_path"] == "/cache/trt"
        assert params.get("trt_layer_norm_fp32_fallback") == ("true" if precision == "fp16" else None)
        low, opt, high = (_profile(params[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
        assert set(low) == set(opt) == set(high) == {t.name for t in spec.inputs}
        for t in spec.inputs:
            if spec.max_batch_size > 0:  # batch axis 1..max_batch_size, optimised for the full batch
                assert [low[t.name][0], opt[t.name][0], high[t.name][0]] == [1, spec.max_batch_size, spec.max_batch_size]
                assert low[t.name][1:] == list(t.dims)
            else:  # decoders: 1 .. DECODER_MAX_BOXES boxes, optimised for one pipeline chunk;
                # the ROI decoder's window sides from the smallest to the largest ROI window
                small, large = (min(family.roi_windows), max(family.roi_windows)) if role == "roi_decoder" else (None, None)
                want = {(1, small): low, (family.decoder_chunk, small): opt, (DECODER_MAX_BOXES, large): high}
                for (boxes, side), profile in want.items():
                    assert profile[t.name] == [(boxes if i == 0 else side) if d < 0 else d for i, d in enumerate(t.dims)]
        batching = config.dynamic_batching
        assert config.HasField("dynamic_batching") == (spec.max_batch_size > 0)
        if spec.max_batch_size > 0:
            assert batching.max_queue_delay_microseconds > 0
            assert max(batching.preferred_batch_size) == spec.max_batch_size
            assert all(1 <= b <= spec.max_batch_size for b in batching.preferred_batch_size)
        assert config.model_warmup, "every GPU model warms up before it reports ready"
        for warm in config.model_warmup:
            assert 1 <= warm.batch_size <= max(1, spec.max_batch_size)
            assert set(warm.inputs) == {t.name for t in spec.inputs}
            for t in spec.inputs:
                dims = list(warm.inputs[t.name].dims)
                assert all(d > 0 for d in dims) and len(dims) == len(t.dims)
                assert all(w == d for w, d in zip(dims, t.dims) if d > 0)
                assert warm.inputs[t.name].random_data


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda f: f.name)
def test_every_family_renders_its_point_decoder_and_grid(family: Family) -> None:
    """Every SAM family serves point prompts and grid mode (export writes them beside its pipeline)."""
    from cellsam_triton.contracts import MAX_PROMPT_POINTS
    from cellsam_triton.export.grid_repository import served_roles

    roles = dict((spec.name, role) for role, spec in served_roles(family))
    assert roles[family.point_decoder_name] == "point_decoder" and roles[family.grid_name] == "pipeline"
    spec = family.point_decoder()
    assert spec.input("point_coords").dims == (-1, -1, 2) and spec.input("point_labels").dims == (-1, -1)
    grid = parse_config(render_config(family.grid_pipeline(), "cpu", "pipeline", family=family))
    assert Family.from_json(grid.parameters["family"].string_value).grid == family.grid
    config = parse_config(render_config(spec, "gpu", "point_decoder", family=family))
    assert config.instance_group[0].count == GPU_INSTANCES["point_decoder"]
    low, opt, high = (_profile(_trt(config)[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    assert (low["point_coords"], opt["point_coords"], high["point_coords"]) == (
        [1, 1, 2], [family.decoder_chunk, 1, 2], [DECODER_MAX_BOXES, MAX_PROMPT_POINTS, 2])  # one point: the grid's
    assert high["point_labels"] == [DECODER_MAX_BOXES, MAX_PROMPT_POINTS]
    (warm,) = config.model_warmup
    assert list(warm.inputs["point_coords"].dims) == [family.decoder_chunk, 1, 2]


def test_a_windowed_grid_serves_its_window_point_decoder_with_its_own_trt_profile() -> None:
    """The default family decodes grid points on windows: export serves ``<family>_roi_point_decoder``
    (one point a prompt), its TensorRT profile and warm-up on the grid's window side; families that
    decode grid points whole do not serve it."""
    from cellsam_triton.contracts import LITE
    from cellsam_triton.export.grid_repository import served_roles

    assert LITE.grid.window > 0
    roles = dict((spec.name, role) for role, spec in served_roles(LITE))
    assert roles[LITE.roi_point_decoder_name] == "roi_point_decoder"
    for family in FAMILIES.values():
        if family.grid.window == 0:
            assert family.roi_point_decoder_name not in dict((s.name, r) for r, s in served_roles(family))
    spec = LITE.roi_point_decoder()
    config = parse_config(render_config(spec, "gpu", "roi_point_decoder", family=LITE))
    assert config.instance_group[0].count == GPU_INSTANCES["roi_point_decoder"]
    low, opt, high = (_profile(_trt(config)[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    w = LITE.grid.window
    assert (low["embedding_windows"], high["embedding_windows"]) == ([1, LITE.embed_dim, w, w], [DECODER_MAX_BOXES, LITE.embed_dim, w, w])
    assert opt["point_coords"] == [LITE.decoder_chunk, 1, 2] and high["point_labels"] == [DECODER_MAX_BOXES, 1]
    (warm,) = config.model_warmup
    assert list(warm.inputs["embedding_windows"].dims) == [LITE.decoder_chunk, LITE.embed_dim, w, w]
    cpu = parse_config(render_config(spec, "cpu", "roi_point_decoder", family=LITE))
    assert cpu.backend == "python"


def test_gpu_warmup_covers_the_full_batch() -> None:
    spec = FAMILIES["cellsam"].encoder()
    config = parse_config(render_config(spec, "gpu", "encoder", family=FAMILIES["cellsam"]))
    assert sorted(w.batch_size for w in config.model_warmup) == [1, spec.max_batch_size]


def test_unknown_precision_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match="unknown precision"):
        GpuOptions(precision="int4")


def test_export_cli_accepts_gpu_precision(tmp_path) -> None:
    from cellsam_triton.cli import build_parser

    args = build_parser("export").parse_args(
        ["export", "--repository", str(tmp_path), "--target", "gpu", "--precision", "fp16", "--trt-cache", "/trt"]
    )
    assert (args.target, args.precision, args.trt_cache) == ("gpu", "fp16", "/trt")
    with pytest.raises(SystemExit):
        build_parser("export").parse_args(["export", "--repository", str(tmp_path), "--precision", "fp8"])


def test_a_failed_export_installs_nothing(tmp_path, monkeypatch, capsys) -> None:
    """README (Export): a failed parity check exits non-zero and installs nothing; the export is
    staged beside the repository and the models served before stay as they were."""
    from cellsam_triton.cli import main as cli
    from cellsam_triton.export import command

    family = FAMILIES["cellsam_lite"]
    repo = tmp_path / "repository"
    (repo / family.encoder_name / "1").mkdir(parents=True)
    served_before = repo / family.encoder_name / "1" / "model.onnx"
    served_before.write_bytes(b"the model served before")

    def fails_its_parity_check(family_, staging, args):
        (staging / family.encoder_name / "1").mkdir(parents=True)
        (staging / family.encoder_name / "1" / "model.onnx").write_bytes(b"exported, then refused")
        raise UserError(f"parity check failed: {family.decoder_name} masks 1.00e+00 > tolerance")

    monkeypatch.setattr(command, "export_family", fails_its_parity_check)
    assert cli(["export", "--repository", str(repo)]) != 0
    assert "parity check failed" in capsys.readouterr().err
    assert served_before.read_bytes() == b"the model served before"
    assert sorted(p.name for p in repo.iterdir()) == [family.encoder_name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repository"], "staging folder left behind"
