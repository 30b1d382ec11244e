"""CellSAM model code: checkpoint layout and loading, clear errors, ONNX export parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellsam_triton.contracts import CELLSAM
from cellsam_triton.errors import UserError
from cellsam_triton.export.cellsam_export import export_cellsam, export_detector, model_path, random_boxes
from cellsam_triton.export.models.cellsam import build_cellsam, load_checkpoint, make_random_checkpoint
from cellsam_triton.export.onnx_export import consolidate_external_data, export_onnx, graph_inputs

from checkpoints import CELLFINDER, sam_loop_decode, small_state

ort = pytest.importorskip("onnxruntime")


def _forward_all(modules, image: torch.Tensor) -> list[np.ndarray]:
    boxes = torch.tensor([[100.0, 120.0, 300.0, 260.0], [500.0, 40.0, 560.0, 90.0]])
    with torch.no_grad():
        emb = modules.encoder(image)
        outs = [emb, *modules.cellfinder(image), *modules.decoder(emb, boxes)]
    return [t.numpy() for t in outs]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference_outputs(image) -> list[np.ndarray]:
    return _forward_all(build_cellsam(small_state()), image)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small random checkpoint exported once: (modules, repository dir, reports)."""
    tmp = tmp_path_factory.mktemp("cellsam")
    checkpoint = tmp / "cellsam_small.pt"
    torch.save(small_state(), checkpoint)
    repo = tmp / "repo"
    reports = export_cellsam(checkpoint, repo, tolerance=1e-3)
    return build_cellsam(load_checkpoint(checkpoint)), repo, reports


# --- checkpoint layout ----------------------------------------------------------------------------


def test_random_checkpoint_has_the_official_layout():
    state = small_state()
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"model", "model_cp", "cellfinder"}
    segmenter = {k[len("model_cp."):] for k in state if k.startswith("model_cp.")}
    unused = {k[len("model."):] for k in state if k.startswith("model.")}
    assert segmenter == unused
    assert {k.split(".")[0] for k in segmenter} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert f"{CELLFINDER}input_proj.0.1.weight" in state and f"{CELLFINDER}backbone.body.pos_embed" in state
    assert not any(k.startswith(f"{CELLFINDER}backbone.body.neck") for k in state)
    # the unused copy holds different weights, and per-layer heads are identical (shared upstream)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(state["model." + key], state["model_cp." + key])
    t = f"{CELLFINDER}transformer."
    assert torch.equal(state[t + "class_embed.0.weight"], state[t + "class_embed.1.weight"])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_small_model_outputs_are_sane(reference_outputs):
    emb, logits, boxes, masks, iou = reference_outputs
    assert emb.shape == (1, 256, 64, 64)
    assert logits.shape == (1, 300, 2) and boxes.shape == (1, 300, 4)
    assert masks.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert all(np.isfinite(a).all() for a in reference_outputs)
    assert 0 < boxes.min() and boxes.max() < 1
    assert np.abs(emb).max() < 100 and np.abs(logits).max() < 100
    assert boxes.std() > 1e-3 and logits.std() > 1e-4  # not a constant output


def test_model_copy_is_ignored_when_model_cp_is_present(image, reference_outputs):
    state = small_state()
    for k in [k for k in state if k.startswith("model.")]:
        state[k] = torch.full_like(state[k], float("nan"))
    state["model.image_encoder.something_else"] = torch.zeros(3)  # even unknown keys under model.*
    for want, got in zip(reference_outputs, _forward_all(build_cellsam(state), image)):
        np.testing.assert_array_equal(want, got)


def test_model_is_the_segmenter_when_model_cp_is_absent(image, reference_outputs):
    state = {k: v for k, v in small_state().items() if not k.startswith("model.")}
    state = {("model." + k[len("model_cp."):] if k.startswith("model_cp.") else k): v for k, v in state.items()}
    for want, got in zip(reference_outputs, _forward_all(build_cellsam(state), image)):
        np.testing.assert_array_equal(want, got)


# --- clear errors for wrong checkpoints -------------------------------------------------------------


def _error(state: dict) -> str:
    with pytest.raises(UserError) as info:
        build_cellsam(state)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_keys_are_named_with_a_count():
    state = small_state()
    gone = [k for k in state if k.startswith(f"{CELLFINDER}transformer.decoder_layers.1.")][:5]
    for k in gone:
        del state[k]
    message = _error(state)
    assert "5 missing keys" in message and gone[0] in message and "(5 in all)" in message


def test_unexpected_keys_are_named():
    state = small_state()
    state[f"{CELLFINDER}transformer.level_embed.weight"] = torch.zeros(1, 64)
    state["optimizer.step"] = torch.zeros(1)
    message = _error(state)
    assert "2 unexpected keys" in message
    assert "level_embed.weight" in message and "optimizer.step" in message


def test_shape_mismatches_are_named():
    state = small_state()
    key = f"{CELLFINDER}transformer.decoder_layers.0.norm1.weight"
    state[key] = torch.ones(65)
    message = _error(state)
    assert "1 shape mismatches" in message and key in message and "[65]" in message and "[64]" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: {"weight": torch.zeros(2)}, "not a CellSAM checkpoint"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("cellfinder.")}, "no 'cellfinder.*'"),
        (lambda s: {k: v for k, v in s.items() if not k.endswith("image_encoder.pos_embed")}, "model_cp.image_encoder.pos_embed"),
        (lambda s: {**s, "epoch": 3}, "not tensors: epoch"),
    ],
)
def test_not_a_cellsam_checkpoint(change, expected):
    assert expected in _error(change(small_state()))


def test_load_checkpoint_errors_and_wrapping(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    with pytest.raises(UserError, match="cannot read checkpoint") as info:
        load_checkpoint(corrupt)
    assert "\n" not in str(info.value)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 1}, wrapped)
    assert list(load_checkpoint(wrapped)) == ["a"]
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(UserError, match="does not hold a state dict"):
        load_checkpoint(listed)


# --- ONNX export ----------------------------------------------------------------------------------


def test_export_writes_the_contract_models_within_tolerance(exported):
    modules, repo, reports = exported
    assert len(reports) == 4
    for spec, report in zip((CELLSAM.encoder(), CELLSAM.detector_model(), CELLSAM.decoder(), CELLSAM.point_decoder()), reports):
        path = model_path(repo, spec)
        assert report.path == path and path.is_file()
        assert graph_inputs(path) == [t.name for t in spec.inputs]  # nothing traced as a constant
        assert list(report.max_abs_error) == [t.name for t in spec.outputs]
        assert all(err <= 1e-3 for err in report.max_abs_error.values()), report
    assert reports[2].input_sets == 3  # decoder checked at several box counts
    assert reports[3].input_sets == 3  # point decoder at several prompt and point counts (padded with -1)


@pytest.mark.parametrize("which", ["encoder", "detector"])
def test_exported_batch_axis_is_dynamic(exported, which):
    modules, repo, _ = exported
    spec = CELLSAM.encoder() if which == "encoder" else CELLSAM.detector_model()
    module = modules.encoder if which == "encoder" else modules.cellfinder
    image = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(9))
    image[1] = image[1].flip(-1)
    with torch.no_grad():
        want = module(image)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    session = ort.InferenceSession(str(model_path(repo, spec)), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})
    assert not np.allclose(want[0][0], want[0][1])  # the two images give different outputs
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.shape[0] == 2
        np.testing.assert_allclose(g, w, atol=1e-3 * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize("n", [1, 6])
def test_batched_decoder_equals_sam_one_box_loop_in_torch_and_onnx(exported, n):
    modules, repo, _ = exported
    g = torch.Generator().manual_seed(n)
    embeddings = torch.randn(1, 256, 64, 64, generator=g)
    boxes = random_boxes(n, 1024, g)
    want_masks, want_iou = sam_loop_decode(modules.decoder, embeddings, boxes)
    with torch.no_grad():
        masks, iou = modules.decoder(embeddings, boxes)
    np.testing.assert_allclose(masks.numpy(), want_masks, atol=1e-4)
    np.testing.assert_allclose(iou.numpy(), want_iou, atol=1e-5)
    session = ort.InferenceSession(str(model_path(repo, CELLSAM.decoder())), providers=["CPUExecutionProvider"])
    onnx_masks, onnx_iou = session.run(None, {"image_embeddings": embeddings.numpy(), "boxes": boxes.numpy()})
    assert onnx_masks.shape == (n, 1, 256, 256) and onnx_iou.shape == (n, 1)
    np.testing.assert_allclose(onnx_masks, want_masks, atol=1e-3)
    np.testing.assert_allclose(onnx_iou, want_iou, atol=1e-4)


class _IgnoresAnInput(nn.Module):
    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return x * 2


class _BranchesOnData(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x * 3  # the trace keeps one branch


def test_export_onnx_rejects_a_graph_without_its_input(tmp_path):
    example = {"x": torch.ones(2, 3), "unused": torch.ones(2)}
    with pytest.raises(UserError, match="lost input.*unused"):
        export_onnx(_IgnoresAnInput(), example, ["y"], {}, tmp_path / "m.onnx", tolerance=1e-3)


def test_export_onnx_reports_parity_failures(tmp_path):
    positive, negative = {"x": torch.ones(2, 3)}, {"x": -torch.ones(2, 3)}
    report = export_onnx(_BranchesOnData(), positive, ["y"], {}, tmp_path / "ok.onnx", tolerance=1e-6)
    assert report.max_abs_error == {"y": 0.0} and report.input_sets == 1
    with pytest.raises(UserError, match=r"parity check failed.*y 1\.00e\+00"):
        export_onnx(_BranchesOnData(), positive, ["y"], {}, tmp_path / "bad.onnx", 1e-3, check_inputs=[negative])


def test_scattered_external_weights_are_gathered_into_one_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    x = torch.randn(3, 64)
    path = tmp_path / "model.onnx"
    export_onnx(module, {"x": x}, ["y"], {"x": {0: "n"}, "y": {0: "n"}}, path, tolerance=1e-5)
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) > 2  # one file per weight, as the exporter writes > 2 GB models
    consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-5)


# --- full size ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vit_b_cellfinder_onnx_matches_pytorch(tmp_path):
    """Official ViT-B layout (1041 tensors, ~290 M parameters): CellFinder ONNX vs PyTorch."""
    state = make_random_checkpoint(None, "vit_b", seed=1)
    assert len(state) == 1041
    assert 285e6 < sum(v.numel() for v in state.values()) < 295e6
    modules = build_cellsam(state)
    del state
    assert modules.cellfinder.config.num_queries == 3500 and modules.cellfinder.config.vit.num_heads == 12
    report = export_detector(modules, tmp_path, tolerance=1e-3)
    assert graph_inputs(report.path) == ["image"]
    assert report.max_abs_error["pred_logits"] <= 1e-3 and report.max_abs_error["pred_boxes"] <= 1e-3, report
