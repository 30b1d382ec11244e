"""CellSeg1 on the LiteMedSAM base: TinyViT LoRA merge, `finetune` CLI (with its grid calibration),
merged ONNX vs unmerged PyTorch (random adapters), the calibrated threshold served by export, the
in-process grid rules vs the served pipeline, and `segment --prompts grid` on a real DSB2018 image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tifffile
import torch

from cellsam_triton.cli import main as cli
from cellsam_triton.contracts import CELLSEG1_LITE
from cellsam_triton.export.finetune_data import check_labels, random_view, sample_prompts
from cellsam_triton.export.grid_calibration import CANDIDATES
from cellsam_triton.export.models import lite_lora
from cellsam_triton.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
RANK = 4


def _lite():
    from cellsam_triton.export.models.litemedsam import load_litemedsam
    from cellsam_triton.export.models.point_decoder import PointDecoder

    lite = load_litemedsam()
    return lite.encoder.eval(), PointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder).eval()


def _randomise(modules, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if name.endswith((".a.weight", ".b.weight")):
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def unmerged(tmp_path_factory: pytest.TempPathFactory):
    """LiteMedSAM with random (non-zero) adapters attached, unmerged, and their adapter file."""
    encoder, decoder = _lite()
    lite_lora.attach_lite_lora(encoder, decoder.mask_decoder, RANK)
    _randomise([encoder, decoder], torch.Generator().manual_seed(5), 0.05)
    with torch.no_grad():
        decoder.mask_decoder.iou_token.weight.add_(0.1)  # a full tensor trained outside the transformer
    adapters = lite_lora.lite_adapter_state(encoder, decoder.prompt_encoder, decoder.mask_decoder)
    path = tmp_path_factory.mktemp("lite_lora") / "lora.pth"
    torch.save(adapters, path)
    return encoder.eval(), decoder.eval(), adapters, path


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 256, 256, generator=g)
    coords = torch.rand(5, 1, 2, generator=g) * 256
    labels = torch.tensor([[1.0], [1.0], [0.0], [1.0], [1.0]])
    return image, coords, labels


def test_adapter_file_layout_and_exact_merge(unmerged) -> None:
    encoder, decoder, adapters, _ = unmerged
    attentions = lite_lora.tiny_attentions(encoder)
    assert len(attentions) >= 8 and f"w_a_{2 * len(attentions) - 1:03d}" in adapters
    first = attentions[0]
    heads, kd, d = first.num_heads, first.key_dim, first.qkv.d
    assert adapters["w_b_000"].shape == (heads * kd, RANK) and adapters["w_b_001"].shape == (heads * d, RANK)
    assert {"sa_a_000", "cti_b_003", "cit_a_001", "fati_qa", "mask_decoder.iou_token.weight"} <= set(adapters)

    image, coords, labels = _inputs()
    with torch.no_grad():
        want_emb = encoder(image)
        want_masks, want_iou = decoder(want_emb, coords, labels)
        plain_emb = _lite()[0](image)
    assert (want_emb - plain_emb).abs().max() > 1e-2  # the adapters matter: the check below is not vacuous
    merged_encoder, merged_decoder = _lite()
    lite_lora.merge_lite_lora(merged_encoder, merged_decoder.prompt_encoder, merged_decoder.mask_decoder, adapters)
    with torch.no_grad():
        emb = merged_encoder(image)
        masks, iou = merged_decoder(emb, coords, labels)
    torch.testing.assert_close(emb, want_emb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masks, want_masks, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=1e-4)


def test_merge_rejects_a_sam_vit_adapter_file(unmerged) -> None:
    encoder, decoder = _lite()
    bad = {**unmerged[2], "w_a_999": torch.zeros(RANK, 64)}
    with pytest.raises(UserError, match="not a LiteMedSAM adapter file"):
        lite_lora.merge_lite_lora(encoder, decoder.prompt_encoder, decoder.mask_decoder, bad)


def test_views_and_prompts_follow_the_labels() -> None:
    labels = np.zeros((300, 280), np.int64)
    labels[20:40, 30:50] = 1
    labels[100:130, 200:220] = 2
    labels[250:260, 10:25] = 3
    image = np.random.default_rng(0).random((300, 280, 3)).astype(np.float32)
    rng = np.random.default_rng(1)
    for _ in range(5):
        view = random_view(image, labels, 256, rng)
        assert view.image.shape == (3, 256, 256) and view.labels.shape == (256, 256)
        assert 0 <= view.image.min() and view.image.max() <= 1
        prompts = sample_prompts(view, count=8, background=2, rng=rng)
        fg = int(prompts.foreground.sum())
        assert len(prompts.points) == fg + 2 and fg <= 3
        for (x, y), target, is_fg in zip(prompts.points.astype(int), prompts.targets, prompts.foreground):
            assert target[y, x] == is_fg  # each point lies in its own target (background: empty target)
            assert is_fg or not target.any()
    with pytest.raises(UserError, match="no labelled instance"):
        check_labels(np.zeros((4, 4)), (4, 4), "x")
    with pytest.raises(UserError, match="image 4x5"):
        check_labels(np.ones((4, 4)), (4, 5), "x")


@pytest.fixture(scope="module")
def dsb_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A real DSB2018 validation image (256x256, fluorescence) and its labels as TIFF files."""
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA} (../shared absent): real-image CellSeg1 tests skipped")
    from cellsam_triton.datasets import load_manifest, load_sample, split_of

    record = next(r for r in load_manifest(DATA) if split_of(r.id) == "val" and (r.height, r.width) == (256, 256)
                  and r.kind == "fluorescence" and r.objects >= 15)
    image, labels = load_sample(DATA, record.id)
    root = tmp_path_factory.mktemp("dsb_pair")
    tifffile.imwrite(root / "image.tif", image)
    tifffile.imwrite(root / "labels.tif", labels.astype(np.uint16))
    return root / "image.tif", root / "labels.tif", labels


def test_finetune_cli_writes_adapters_and_provenance(dsb_pair, tmp_path: Path, capsys) -> None:
    image, labels, _ = dsb_pair
    out = tmp_path / "lora.pth"
    code = cli(["finetune", "--image", str(image), "--labels", str(labels), "--out", str(out),
                "--epochs", "2", "--prompts", "4", "--background", "1", "--seed", "3", "--no-progress", "--encoder-lora",
                "--calibration-points", "4"])
    assert code == 0
    adapters = torch.load(out, weights_only=True)
    assert "w_a_000" in adapters and "fati_vb" in adapters and "mask_decoder.iou_token.weight" in adapters
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["config"]["seed"] == 3 and provenance["config"]["epochs"] == 2
    assert len(provenance["image_sha256"]) == 64 and provenance["adapter_sha256"]
    assert np.isfinite(provenance["loss_last"]) and provenance["instances"] > 0
    from cellsam_triton.export.lite_export import DEFAULT_POINT_DECODER_WEIGHTS, grid_selection

    grid = provenance["grid"]  # from the point decoder: its thresholds chosen on train are kept
    chosen = grid_selection(DEFAULT_POINT_DECODER_WEIGHTS)
    assert grid["points_per_side"] == 4 and "select-grid" in grid["rule"]
    assert (grid["pred_iou_threshold"], grid["stability_threshold"]) == (chosen["pred_iou_threshold"], chosen["stability_threshold"])
    f1 = {float(t): v for t, v in grid["training_f1_by_threshold"].items()}
    assert sorted(f1) == sorted(CANDIDATES)  # the sweep on the training image, recorded
    assert provenance["config"]["lr"] == 2e-4 and provenance["config"]["full_lr"] == 1e-4  # a point decoder's rates
    assert provenance["served_scale"] >= 1.0
    out_text = capsys.readouterr().out
    assert "wrote" in out_text and f"predicted IoU >= {grid['pred_iou_threshold']:g}" in out_text
    # from LiteMedSAM's own decoder (CellSeg1's recipe): its rates, the best threshold on the training image
    plain = tmp_path / "plain.pth"
    assert cli(["finetune", "--image", str(image), "--labels", str(labels), "--out", str(plain), "--epochs", "1",
                "--prompts", "2", "--base-decoder", "litemedsam", "--no-progress", "--calibration-points", "4"]) == 0
    plain_record = json.loads(plain.with_suffix(".json").read_text())
    f1 = {float(t): v for t, v in plain_record["grid"]["training_f1_by_threshold"].items()}
    assert f1[plain_record["grid"]["pred_iou_threshold"]] == max(f1.values()) and "stability_threshold" not in plain_record["grid"]
    assert plain_record["config"]["lr"] == 2e-3 and plain_record["base"]["decoder_sha256"] is None
    assert lite_lora.BASE_KEY not in torch.load(plain, weights_only=True)
    # without the sweep the point decoder's thresholds are still what export will serve
    quick = tmp_path / "quick.pth"
    assert cli(["finetune", "--image", str(image), "--labels", str(labels), "--out", str(quick), "--epochs", "1",
                "--prompts", "2", "--no-calibrate", "--no-progress"]) == 0
    quick_grid = json.loads(quick.with_suffix(".json").read_text())["grid"]
    assert quick_grid["pred_iou_threshold"] == chosen["pred_iou_threshold"] and "training_f1_by_threshold" not in quick_grid
    assert "kept from the base decoder" in capsys.readouterr().out
    from cellsam_triton.export.cellseg1_export import load_lite_base

    assert provenance["base"]["decoder"] == "lite_decoder_points.pt"  # the default model's point decoder
    assert lite_lora.base_decoder_sha256(adapters) == provenance["base"]["decoder_sha256"]
    load_lite_base(out)  # the file merges into a fresh copy of that base


def _synthetic_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 image of bright squares on a dark ground and their labels."""
    labels = np.zeros((256, 256), np.int64)
    for i, (y, x) in enumerate([(30, 40), (90, 150), (160, 60), (200, 200), (60, 210)], start=1):
        labels[y:y + 18, x:x + 18] = i
    image = (labels > 0).astype(np.float32) * 0.8 + np.random.default_rng(0).random((256, 256)).astype(np.float32) * 0.1
    return np.repeat(image[..., None], 3, axis=-1), labels


def test_training_views_follow_the_served_scale() -> None:
    """Small cells: the image is enlarged by the factor the served model's auto-scale picks for
    them (256x256 with ~10 px nuclei -> 1.75x, 4 tiles); large cells keep the native scale."""
    from cellsam_triton.client.autoscale import auto_factor
    from cellsam_triton.export.finetune import FinetuneConfig, with_base_rates
    from cellsam_triton.export.finetune_data import at_served_scale

    image, labels = _synthetic_pair()  # 18 px squares: native
    same = at_served_scale(image, labels, CELLSEG1_LITE)
    assert same[2] == 1.0 and same[0] is image
    small = np.zeros((256, 256), np.int64)
    for i in range(25):
        y, x = divmod(i, 5)
        small[20 + 45 * y:30 + 45 * y, 20 + 45 * x:30 + 45 * x] = i + 1
    big_image, big_labels, factor = at_served_scale(image, small, CELLSEG1_LITE)
    cells = [{"x0": 0, "x1": 10, "y0": 0, "y1": 10}] * 3
    assert factor == auto_factor(cells, CELLSEG1_LITE, (256, 256)) == 1.75
    assert big_image.shape == (448, 448, 3) and big_labels.shape == (448, 448)
    assert set(np.unique(big_labels)) == set(np.unique(small))  # every instance kept, ids unchanged
    assert abs((big_labels == 7).sum() / (small == 7).sum() - 1.75 ** 2) < 0.4

    assert (with_base_rates(FinetuneConfig()).lr, with_base_rates(FinetuneConfig()).full_lr) == (2e-4, 1e-4)
    assert with_base_rates(FinetuneConfig(base_decoder="litemedsam")).lr == 2e-3
    assert with_base_rates(FinetuneConfig(lr=5e-4)).lr == 5e-4


def test_finetune_starts_from_the_point_decoder_and_export_merges_into_it(tmp_path: Path) -> None:
    """Default base: the default model's point decoder; the adapter file names it (sha256) and
    `load_lite_base` (export) merges into it, matching the unmerged trained modules; merged into
    LiteMedSAM's own decoder instead the answers differ (so the base matters). ``--base-decoder
    litemedsam`` writes no base key (CellSeg1's recipe)."""
    from cellsam_triton.export.cellseg1_export import load_lite_base
    from cellsam_triton.export.finetune import FinetuneConfig
    from cellsam_triton.export.finetune_data import normalise
    from cellsam_triton.export.finetune_train import Trainer
    from cellsam_triton.export.lite_export import DEFAULT_POINT_DECODER_WEIGHTS
    from cellsam_triton.export.training import sha256_file

    image, labels = _synthetic_pair()
    trainer = Trainer(FinetuneConfig(epochs=2, prompts=3, background=1, views=1, calibrate=False))
    trainer.fit(normalise(image), labels, np.random.default_rng(0), progress=False)
    adapters = trainer.adapters()
    assert lite_lora.base_decoder_sha256(adapters) == sha256_file(DEFAULT_POINT_DECODER_WEIGHTS)
    torch.save(adapters, tmp_path / "lora.pth")
    _, merged = load_lite_base(tmp_path / "lora.pth")
    _, base = load_lite_base(None)  # no adapters: the base itself
    wrong_encoder, wrong = _lite()
    lite_lora.merge_lite_lora(wrong_encoder, wrong.prompt_encoder, wrong.mask_decoder, adapters)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(1, 256, 64, 64, generator=g) * 0.5
    coords, point_labels = torch.rand(4, 1, 2, generator=g) * 256, torch.ones(4, 1)
    with torch.no_grad():
        want = trainer.decoder(emb, coords, point_labels)[0]
        have = merged(emb, coords, point_labels)[0]
        other = wrong(emb, coords, point_labels)[0]
        before = base(emb, coords, point_labels)[0]
    torch.testing.assert_close(have, want, atol=1e-3, rtol=1e-4)
    assert (other - want).abs().max() > 0.5 and (before - want).abs().max() > 1e-3
    # no lora.json beside it: export serves the base decoder's grid thresholds chosen on train
    from argparse import Namespace

    from cellsam_triton.export.command import served_grid_family
    from cellsam_triton.export.lite_export import grid_selection

    family, source = served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=None, lora=tmp_path / "lora.pth"))
    chosen = grid_selection(DEFAULT_POINT_DECODER_WEIGHTS)
    assert "base decoder" in source and family.grid.pred_iou_threshold == chosen["pred_iou_threshold"]

    plain = Trainer(FinetuneConfig(epochs=1, prompts=2, background=0, views=1, calibrate=False, base_decoder="litemedsam"))
    assert lite_lora.BASE_KEY not in plain.adapters() and plain.base["decoder_sha256"] is None


def test_adapter_of_an_unknown_base_is_a_one_line_error(unmerged, tmp_path: Path, capsys) -> None:
    lora = tmp_path / "lora.pth"
    torch.save(lite_lora.with_base_decoder(unmerged[2], "ab" * 32), lora)
    code = cli(["export", "--model", "cellseg1", "--lora", str(lora), "--repository", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "fine-tuned from decoder weights with sha256 abababababab" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    torch.save({**unmerged[2], lite_lora.BASE_KEY: torch.zeros(3, dtype=torch.uint8)}, lora)
    with pytest.raises(UserError, match="not a sha256"):
        lite_lora.base_decoder_sha256(torch.load(lora, weights_only=True))
    code = cli(["finetune", "--image", str(lora), "--labels", str(lora), "--base-decoder", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert code != 0 and "--base-decoder" in err and "Traceback" not in err


def test_finetune_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((32, 32), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros((32, 40), np.uint16))
    code = cli(["finetune", "--image", str(image), "--labels", str(tmp_path / "labels.npy")])
    err = capsys.readouterr().err
    assert code != 0 and "labels are 32x40" in err and "Traceback" not in err
    code = cli(["finetune", "--image", str(tmp_path / "missing.tif"), "--labels", str(image), "--epochs", "1"])
    assert code != 0 and "no such file" in capsys.readouterr().err


SERVED_IOU = 0.3  # the "calibrated" threshold written beside the random adapters


@pytest.fixture(scope="module")
def lite_repository(unmerged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export --model cellseg1 --lora` (no --sam-checkpoint: LiteMedSAM base) with the random adapters
    and a provenance file beside them holding a calibrated grid threshold."""
    provenance = unmerged[3].with_suffix(".json")
    provenance.write_text(json.dumps({"grid": {"pred_iou_threshold": SERVED_IOU}}))
    repo = tmp_path_factory.mktemp("cellseg1_lite") / "repository"
    try:
        assert cli(["export", "--model", "cellseg1", "--lora", str(unmerged[3]), "--repository", str(repo), "--threads", "1"]) == 0
    finally:
        provenance.unlink()
    return repo


def _served_family(repo: Path) -> dict:
    from cellsam_triton.export.repository import parse_config

    config = parse_config(repo / "cellseg1_lite_grid" / "config.pbtxt")
    return json.loads(config.parameters["family"].string_value)


def test_export_serves_the_calibrated_grid_threshold(lite_repository: Path, unmerged, tmp_path: Path, capsys) -> None:
    assert _served_family(lite_repository)["grid"]["pred_iou_threshold"] == SERVED_IOU
    from argparse import Namespace

    from cellsam_triton.export.command import served_grid_family

    lora = unmerged[3]
    family, source = served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=0.7, lora=lora))
    assert family.grid.pred_iou_threshold == 0.7 and source == "--grid-iou-threshold"
    family, source = served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=None, lora=lora))
    assert family.grid.pred_iou_threshold == 0.8 and "CellSeg1" in source  # no provenance file: CellSeg1's
    assert cli(["export", "--model", "cellseg1", "--lora", str(lora), "--repository", str(tmp_path / "r"),
                "--grid-iou-threshold", "1.5"]) != 0
    err = capsys.readouterr().err
    assert "must be in [0, 1]" in err and "Traceback" not in err and not (tmp_path / "r").exists()
    assert cli(["export", "--repository", str(tmp_path / "r"), "--grid-iou-threshold", "0.5"]) != 0
    assert "is for --model cellseg1" in capsys.readouterr().err
    # a provenance file whose thresholds were kept from the base decoder: both are served
    kept = tmp_path / "kept.pth"
    kept.write_bytes(lora.read_bytes())
    kept.with_suffix(".json").write_text(json.dumps({"grid": {"pred_iou_threshold": 0.45, "stability_threshold": 0.55}}))
    family, source = served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=None, lora=kept))
    assert (family.grid.pred_iou_threshold, family.grid.stability_threshold) == (0.45, 0.55) and "kept" in source
    kept.with_suffix(".json").write_text(json.dumps({"grid": {"pred_iou_threshold": 0.45, "stability_threshold": 2}}))
    with pytest.raises(UserError, match="stability threshold must be in"):
        served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=None, lora=kept))
    # no adapters: the point decoder `finetune` starts from, with the grid thresholds chosen on train for it
    from cellsam_triton.export.lite_export import DEFAULT_POINT_DECODER_WEIGHTS, grid_selection

    chosen = grid_selection(DEFAULT_POINT_DECODER_WEIGHTS)
    family, source = served_grid_family(CELLSEG1_LITE, Namespace(grid_iou_threshold=None, lora=None))
    assert "chosen on train" in source and chosen
    assert (family.grid.pred_iou_threshold, family.grid.stability_threshold) == (chosen["pred_iou_threshold"], chosen["stability_threshold"])


def test_merged_onnx_matches_unmerged_pytorch(unmerged, lite_repository: Path) -> None:
    encoder, decoder, _, _ = unmerged

    def session(spec):
        return ort.InferenceSession(str(lite_repository / spec.name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    image, coords, labels = _inputs(1)
    with torch.no_grad():
        want_emb = encoder(image)
        want_masks, want_iou = decoder(want_emb, coords, labels)
    emb = session(CELLSEG1_LITE.encoder()).run(None, {"image": image.numpy()})[0]
    np.testing.assert_allclose(emb, want_emb.numpy(), atol=1e-3 * max(1.0, float(want_emb.abs().max())))
    masks, iou = session(CELLSEG1_LITE.point_decoder()).run(
        None, {"image_embeddings": want_emb.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy()})
    np.testing.assert_allclose(masks, want_masks.numpy(), atol=1e-3 * max(1.0, float(want_masks.abs().max())))
    np.testing.assert_allclose(iou, want_iou.numpy(), atol=1e-3)
    names = sorted(p.name for p in lite_repository.iterdir() if p.is_dir())
    assert names == sorted(["cellseg1_lite", "cellseg1_lite_encoder", "cellseg1_lite_decoder",
                            "cellseg1_lite_point_decoder", "cellseg1_lite_roi_point_decoder", "cellseg1_lite_grid",
                            "cellseg1_lite_labels"])
    for pipeline in ("cellseg1_lite", "cellseg1_lite_grid"):
        assert (lite_repository / pipeline / "1" / "bls.py").is_file()  # shared BLS glue beside both


def test_in_process_grid_matches_the_served_pipeline(dsb_pair, unmerged, lite_repository: Path, server_factory) -> None:
    """The calibration's in-process grid (PyTorch, unmerged adapters) segments as the served
    `<model>_grid` does (merged ONNX): same rules, same code. The served default threshold is the
    calibrated one from the provenance file."""
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.client.grid_rules import GridOptions, segment_grid
    from cellsam_triton.client.metrics import score_image
    from cellsam_triton.client.types import SegmentOptions
    from cellsam_triton.export.grid_calibration import InProcessGrid

    image, _, truth = dsb_pair
    array = tifffile.imread(image)
    server = server_factory(lite_repository)
    server.start(120)
    with Segmenter(server.grpc_url, timeout_s=600) as segmenter:
        served = segmenter.segment(array, prompts="grid", grid=GridOptions(points_per_side=8, stability_threshold=0.0)).labels
    # `cellseg1_lite_labels`, the export's model for clients in any language: the same rules run in the server
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        arrays = {"image": array, "points_per_side": np.array([8], np.int32), "stability_threshold": np.array([0.0], np.float32)}
        inputs = [grpcclient.InferInput(k, list(v.shape), "UINT8" if k == "image" else "INT32" if v.dtype == np.int32 else "FP32")
                  for k, v in arrays.items()]
        for tensor, value in zip(inputs, arrays.values()):
            tensor.set_data_from_numpy(value)
        np.testing.assert_array_equal(client.infer("cellseg1_lite_labels", inputs, client_timeout=600).as_numpy("labels"), served)
    encoder, decoder, _, _ = unmerged
    local_grid = InProcessGrid(encoder, decoder, CELLSEG1_LITE)
    local = segment_grid(array, local_grid, CELLSEG1_LITE, SegmentOptions(),
                         GridOptions(points_per_side=8, pred_iou_threshold=SERVED_IOU, stability_threshold=0.0)).labels
    assert served.max() >= 3, "the random adapters at the served threshold should keep some masks"
    same = score_image(served, local)  # instance by instance
    assert same.f1 >= 0.95 and same.mean_iou >= 0.95, same
    strict = segment_grid(array, local_grid, CELLSEG1_LITE, SegmentOptions(),
                          GridOptions(points_per_side=8, pred_iou_threshold=0.8, stability_threshold=0.0)).labels
    assert strict.max() < served.max()  # the served default is not CellSeg1's 0.8
    assert truth.shape == served.shape


def test_segment_grid_cli_on_a_real_image(dsb_pair, lite_repository: Path, server_factory, tmp_path: Path, capsys) -> None:
    """`segment --prompts grid` through the served grid pipeline on a real DSB image (no --model:
    the repository's only pipeline family is found; the `_grid` model is reached through it)."""
    image, _, truth = dsb_pair
    server = server_factory(lite_repository)
    server.start(120)
    out = tmp_path / "out"
    code = cli(["segment", str(image), "--out", str(out), "--url", server.grpc_url, "--prompts", "grid",
                "--points-per-side", "6", "--overlay"])
    assert code == 0, capsys.readouterr().err
    labels = tifffile.imread(out / "image_labels.tif")
    assert labels.shape == truth.shape
    assert (out / "image_cells.csv").is_file() and (out / "image_overlay.png").is_file()
    code = cli(["segment", str(image), "--out", str(out), "--url", server.grpc_url, "--prompts", "grid", "--grid-iou-threshold", "1.5"])
    err = capsys.readouterr().err
    assert code != 0 and "--grid-iou-threshold must be in [0, 1]" in err and "Traceback" not in err
    code = cli(["segment", str(image), "--out", str(out), "--url", server.grpc_url])  # no detector here
    err = capsys.readouterr().err
    assert code != 0 and "--prompts grid" in err and "Traceback" not in err
