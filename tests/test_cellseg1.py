"""CellSeg1 export: 512-input resizing, LoRA merge, and merged ONNX vs unmerged PyTorch (tiny SAM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cellsam_triton.contracts import CELLSEG1, Family
from cellsam_triton.errors import UserError
from cellsam_triton.export.cellseg1_export import export_cellseg1
from cellsam_triton.export.models import cellseg1
from cellsam_triton.export.models.sam_vit import PromptDecoderConfig, ViTConfig, build_image_encoder, build_prompt_decoder

# a SAM "checkpoint" at 128 input (grid 8, global tables 15 rows), served at 64 (grid 4, 7 rows)
ORIGINAL, SERVED = 128, 64
TINY_VIT = ViTConfig(embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=2, img_size=ORIGINAL, out_chans=16)
TINY = Family(name="tiny_cs1", input_size=SERVED, embed_dim=16, embed_size=4, low_res_size=16, detector="none", preprocess="sam")


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = build_image_encoder(TINY_VIT)
    cfg = PromptDecoderConfig(dim=16, num_heads=8, mlp_dim=32, iou_head_hidden_dim=16, mask_in_chans=4, embed_size=8, input_size=ORIGINAL)
    prompt_encoder, mask_decoder = build_prompt_decoder(cfg)
    state = {}
    for prefix, module in (("image_encoder.", encoder), ("prompt_encoder.", prompt_encoder), ("mask_decoder.", mask_decoder)):
        state.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    for key in state:  # pos_embed and rel-pos tables start at zero: make them matter
        if key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            state[key] = torch.randn_like(state[key]) * 0.5
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    """(SAM checkpoint, adapter file, unmerged PyTorch modules with random non-zero adapters)."""
    tmp = tmp_path_factory.mktemp("cellseg1")
    state = _random_state()
    torch.save(state, tmp / "sam.pth")
    modules = cellseg1.build_sam(cellseg1.resize_to_input(state, SERVED), SERVED)
    decoder = modules.decoder
    cellseg1.attach_lora(decoder.mask_decoder, rank=4, encoder=modules.encoder)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in list(modules.encoder.named_parameters()) + list(decoder.named_parameters()):
            if ".b.weight" in name or ".a.weight" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        decoder.mask_decoder.iou_token.weight.add_(1.0)  # a trained full tensor outside the transformer
        decoder.prompt_encoder.point_embeddings[1].weight.add_(0.5)
    adapters = cellseg1.adapter_state(decoder.prompt_encoder, decoder.mask_decoder, modules.encoder)
    torch.save(adapters, tmp / "lora.pth")
    return tmp / "sam.pth", tmp / "lora.pth", modules, adapters


def test_adapter_file_layout(files):
    _, _, _, adapters = files
    assert adapters["w_a_000"].shape == (4, 32) and adapters["w_b_007"].shape == (32, 4)  # 4 blocks x (q, v)
    assert "w_a_008" not in adapters
    for short in ("sa", "cti", "cit"):
        assert {f"{short}_a_{i:03d}" for i in range(4)} <= set(adapters)  # 2 layers x (q, v)
    assert {"fati_qa", "fati_qb", "fati_va", "fati_vb"} <= set(adapters)
    assert "mask_decoder.iou_token.weight" in adapters and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in adapters
    assert not any(k.startswith("mask_decoder.transformer.") for k in adapters)


def test_resize_keeps_end_rows_and_leaves_windowed_blocks():
    state = _random_state(1)
    resized = cellseg1.resize_to_input(state, SERVED)
    pos = resized["image_encoder.pos_embed"]
    assert pos.shape == (1, 4, 4, 32)
    # align_corners=True: the corner embeddings are kept exactly
    for y, x, oy, ox in ((0, 0, 0, 0), (3, 3, 7, 7), (0, 3, 0, 7)):
        torch.testing.assert_close(pos[0, y, x], state["image_encoder.pos_embed"][0, oy, ox])
    glob = resized["image_encoder.blocks.1.attn.rel_pos_h"]
    old = state["image_encoder.blocks.1.attn.rel_pos_h"]
    assert glob.shape == (7, 16)
    torch.testing.assert_close(glob[[0, -1]], old[[0, -1]])
    torch.testing.assert_close(glob[3], old[7])  # the centre row (offset 0) maps onto itself
    assert torch.equal(resized["image_encoder.blocks.0.attn.rel_pos_w"], state["image_encoder.blocks.0.attn.rel_pos_w"])


def test_merge_adds_b_at_a_to_q_and_v_rows_only(files):
    _, _, _, adapters = files
    state = cellseg1.resize_to_input(_random_state(), SERVED)
    merged = cellseg1.merge_lora(state, adapters)
    key = "image_encoder.blocks.2.attn.qkv.weight"
    delta = merged[key] - state[key]
    torch.testing.assert_close(delta[:32], adapters["w_b_004"] @ adapters["w_a_004"])
    assert torch.count_nonzero(delta[32:64]) == 0
    torch.testing.assert_close(delta[64:], adapters["w_b_005"] @ adapters["w_a_005"])
    key = "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight"
    torch.testing.assert_close(merged[key] - state[key], adapters["cit_b_003"] @ adapters["cit_a_003"])
    with pytest.raises(UserError, match="lacks"):
        cellseg1.merge_lora(state, {**adapters, "w_a_008": adapters["w_a_000"], "w_b_008": adapters["w_b_000"],
                                    "w_a_009": adapters["w_a_000"], "w_b_009": adapters["w_b_000"]})


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_merged_onnx_matches_unmerged_pytorch(files, tmp_path: Path):
    sam, lora, modules, _ = files
    reports = export_cellseg1(sam, lora, tmp_path, tolerance=1e-4, family=TINY)
    assert len(reports) == 3
    def session(spec):
        return ort.InferenceSession(str(tmp_path / spec.name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    image = _rand((2, 3, SERVED, SERVED), 0)
    with torch.no_grad():
        want = modules.encoder(torch.from_numpy(image)).numpy()
    have = session(TINY.encoder()).run(None, {"image": image})[0]
    assert have.shape == (2, 16, 4, 4)
    np.testing.assert_allclose(have, want, atol=1e-4 * max(1, np.abs(want).max()))

    emb = want[:1]
    coords = np.random.default_rng(1).uniform(0, SERVED, (6, 1, 2)).astype(np.float32)
    labels = np.array([[1], [1], [0], [1], [0], [1]], np.float32)
    with torch.no_grad():
        masks, iou = modules.decoder(torch.from_numpy(emb), torch.from_numpy(coords), torch.from_numpy(labels))
    got = session(TINY.point_decoder()).run(None, {"image_embeddings": emb, "point_coords": coords, "point_labels": labels})
    np.testing.assert_allclose(got[0], masks.numpy(), atol=1e-4 * max(1, float(masks.abs().max())))
    np.testing.assert_allclose(got[1], iou.numpy(), atol=1e-4)

    # the adapters really change the outputs (so the check above is not vacuous)
    plain = cellseg1.build_sam(cellseg1.resize_to_input(torch.load(sam), SERVED), SERVED)
    with torch.no_grad():
        assert np.abs(plain.encoder(torch.from_numpy(image)).numpy() - want).max() > 1e-2


def test_point_decoder_matches_segment_anything_prompt_encoder(files):
    """Our batched point embedding equals SAM's own prompt encoder (points, no box: padded)."""
    _, _, modules, _ = files
    pe = modules.decoder.prompt_encoder
    coords = torch.tensor([[[10.0, 20.0]], [[3.0, 60.0]]])
    labels = torch.tensor([[1.0], [0.0]])
    with torch.no_grad():
        ours = modules.decoder.embed_points(coords, labels)
        sparse, _ = pe(points=(coords, labels), boxes=None, masks=None)
    torch.testing.assert_close(ours, sparse)
    # several points a prompt, negatives and SAM's padding (label -1, "not a point") included
    coords = torch.tensor([[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]], [[3.0, 60.0], [8.0, 8.0], [40.0, 41.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])
    with torch.no_grad():
        ours = modules.decoder.embed_points(coords, labels)
        sparse, _ = pe(points=(coords, labels), boxes=None, masks=None)
    torch.testing.assert_close(ours, sparse)


@pytest.mark.parametrize("variant,dim,heads", [("vit_b", 768, 12), ("vit_l", 1024, 16), ("vit_h", 1280, 16)])
def test_official_variants_at_512(variant: str, dim: int, heads: int):
    shapes = cellseg1.variant_shapes(variant)
    assert shapes["image_encoder.pos_embed"] == (1, 32, 32, dim)
    globals_ = cellseg1.VARIANTS[variant].global_attn_indexes
    assert shapes[f"image_encoder.blocks.{globals_[0]}.attn.rel_pos_h"] == (63, dim // heads)
    assert shapes["image_encoder.blocks.0.attn.rel_pos_h"] == (27, dim // heads)
    # the 1024-input checkpoint layout resizes onto exactly these shapes
    original = {k: torch.empty(v, device="meta") for k, v in cellseg1.variant_shapes(variant, 1024).items()}
    resized = cellseg1.resize_to_input(original, 512)
    assert {k: tuple(v.shape) for k, v in resized.items()} == shapes


def test_cellseg1_family_sizes():
    assert (CELLSEG1.input_size, CELLSEG1.embed_size, CELLSEG1.low_res_size) == (512, 32, 128)
    assert CELLSEG1.point_decoder().input("point_coords").dims == (-1, -1, 2)  # N prompts of P points
    assert [t.name for t in CELLSEG1.grid_pipeline().outputs] == [t.name for t in CELLSEG1.pipeline().outputs]


def test_bad_files_are_one_line_errors(tmp_path: Path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch tensor file"):
        cellseg1.load_state(bad)
    with pytest.raises(UserError, match="not found"):
        cellseg1.load_state(tmp_path / "missing.pth")
