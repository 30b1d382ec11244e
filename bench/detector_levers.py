"""CellFinder-lite levers, one table: each detector on the same cached embeddings, box F1@0.5.

For every ``NAME=WEIGHTS`` given, the score threshold and NMS IoU are chosen on the train images
(their own views, best per-image box F1@0.5; never on val), then the val split is scored with them,
overall and by image kind. The first row is the reference; a row is "better" when it beats the
reference on val overall and on the stained kind (the issue's two goals), else "not better"; a
detector is kept only if the served model is better end to end too (`make bench-accuracy
ACCURACY_ARGS="--before DIR"`). The lever of each row is read from its provenance JSON.
Writes ``detector_levers.{json,md}`` into ``--out`` and prints the table.

    python -m bench.detector_levers --data ../shared/data/dsb2018 \
        base=export/weights/cellfinder_lite.pt new=build/detector/ft1.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellsam_triton.errors import UserError

from .report import run_bench

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from cellsam_triton.export.train_detector import CACHE_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detectors", nargs="+", metavar="NAME=WEIGHTS", help="detector weights to compare (first: the reference)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="DSB-layout folder")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_ROOT, help="embedding cache root (built if missing)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N images of each split only")
    parser.add_argument("--encoder-onnx", type=Path, default=None, help=argparse.SUPPRESS)  # tests: a stand-in encoder
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    parser.add_argument("--previous", type=Path, default=None, metavar="JSON",
                        help="keep the rows of an earlier run (detector_levers.json) for detectors not given again, "
                             "if its reference row re-measured here is the same: one table across runs")
    return parser.parse_args(argv)


def lever(weights: Path) -> str:
    """What a detector was trained with, from the provenance JSON beside it."""
    beside = weights.with_suffix(".json")
    if not beside.is_file():
        return "(no provenance)"
    p = json.loads(beside.read_text())
    views = p.get("views", {})
    parts = [f"{'fine-tune' if p.get('init') else 'from scratch'}, {p.get('epochs')} epochs, lr {p.get('lr'):g}",
             f"dihedral views: {','.join(p.get('augment_kinds', [])) or 'none'}"]
    arch = p.get("architecture") or {}
    start = ((p.get("init") or {}).get("provenance") or {}).get("architecture") or {}
    if arch.get("dilations"):
        blocks = len(arch["dilations"])
        grown = f" (grown from {len(start['dilations'])})" if start.get("dilations") and len(start["dilations"]) < blocks else ""
        parts.insert(1, f"width {arch.get('width')}, {blocks} blocks{grown}")
    if arch.get("pixel_width"):
        parts.append(f"pixel branch: {arch['pixel_width']} channels on the tile{' (added)' if not start.get('pixel_width') and p.get('init') else ''}")
    if views.get("color_kinds"):
        parts.append(f"{views['color_views']} stain/colour views: {','.join(views['color_kinds'])}")
    if views.get("scale_kinds"):
        parts.append(f"auto-scale views: {','.join(views['scale_kinds'])}")
    if views.get("invert_kinds"):
        parts.append(f"inverted views: {','.join(views['invert_kinds'])}")
    if p.get("class_loss", "focal") != "focal":
        parts.append(f"class loss: {p['class_loss']}")
    if p.get("kind_weights"):
        parts.append("tile weights " + ",".join(f"{k}={v}" for k, v in p["kind_weights"].items()))
    return "; ".join(parts)


def measure(args: argparse.Namespace) -> dict:
    from cellsam_triton.export.models.detector_lite import load_detector
    from cellsam_triton.export.train_detector import _load_split, at_threshold, choose_on_train, evaluate, prepare_training_set
    from cellsam_triton.export.training import sha256_file

    named = []
    for item in args.detectors:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            raise UserError(f"expected NAME=WEIGHTS with an existing file, got {item!r}")
        named.append((name, Path(path)))
    setup = argparse.Namespace(data=args.data, limit=args.limit, augment_kinds="", color_kinds="", color_views=0, scale_kinds="",
                               invert_kinds="", cache_dir=args.cache_dir, encoder_onnx=args.encoder_onnx, workers=2)
    data = prepare_training_set(setup)
    models = {name: load_detector(path) for name, path in named}
    pixels = any(m.reads_pixels for m in models.values())  # the tiles too, for detectors with a pixel branch
    train = _load_split(args.data, data.split_ids["train"], data.cache_dir, with_image_boxes=True, kinds=data.kinds, with_pixels=pixels)
    val = _load_split(args.data, data.split_ids["val"], data.cache_dir, with_image_boxes=True, kinds=data.kinds, with_pixels=pixels)
    rows = []
    for name, path in named:
        model = models[name]
        selection = choose_on_train(model, train)
        row = at_threshold(evaluate(model, val, selection["nms_iou"]), selection["score_threshold"])
        rows.append({"name": name, "weights": str(path), "weights_sha256": sha256_file(path), "lever": lever(path),
                     "selection": selection, **row})
        print(f"{name}: val box F1 {row['box_f1_mean']:.3f} {row['by_kind']} at {selection}", file=sys.stderr, flush=True)
    if args.previous is not None:
        rows = [rows[0], *carried_rows(rows, args.previous), *rows[1:]]
    verdicts(rows)
    return {"selection_rule": rows[0]["selection"]["rule"], "images": {s: len(v) for s, v in data.split_ids.items()}, "rows": rows}


def carried_rows(rows: list[dict], previous: Path) -> list[dict]:
    """The rows of an earlier run whose detectors are not among ``rows``, each marked with that run's
    date; refused unless the earlier reference row is the one measured now (same weights, same val
    box F1 overall and by kind, same selection): only then do the two runs share one yardstick."""
    try:
        earlier = json.loads(previous.read_text())
        ref, now = earlier["rows"][0], rows[0]
        keys = ("weights_sha256", "box_f1_mean", "by_kind", "precision", "recall")
        same = all(ref[k] == now[k] for k in keys) and ref["selection"]["score_threshold"] == now["selection"]["score_threshold"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"--previous {previous}: not a detector_levers.json ({exc})") from None
    if not same:
        raise UserError(f"--previous {previous}: its reference row ({ref['name']}) differs from the one measured now "
                        "(other weights, data or cache): its rows would not compare")
    given = {r["weights_sha256"] for r in rows}
    date = earlier.get("machine", {}).get("date", str(previous))
    return [{**r, "carried_from": r.get("carried_from", date)} for r in earlier["rows"][1:] if r["weights_sha256"] not in given]


def verdicts(rows: list[dict]) -> None:
    """Each row's box-level verdict against the first (the reference): "better" when it beats it on
    val overall and on the stained kind (the issue's two goals), else "not better". Whether a
    detector is kept is decided end to end (served, mask F1: `make bench-accuracy --before`)."""
    ref = rows[0]
    ref["decision"] = "reference"
    for row in rows[1:]:
        better = row["box_f1_mean"] > ref["box_f1_mean"] and row["by_kind"].get("stained", 0) > ref["by_kind"].get("stained", 0)
        row["decision"] = "better" if better else "not better"


def table(result: dict) -> str:
    kinds = sorted({k for r in result["rows"] for k in r["by_kind"]})
    head = ["detector", "lever", "score / NMS (chosen on train)", "val box F1", *[f"val {k}" for k in kinds], "precision", "recall",
            "train brightfield (seen in training)", "box-level verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        measured = f" (measured {r['carried_from'][:10]})" if r.get("carried_from") else ""
        cells = [r["name"] + measured, r["lever"], f"{r['selection']['score_threshold']:g} / {r['selection']['nms_iou']:g}", f"{r['box_f1_mean']:.3f}",
                 *[f"{r['by_kind'].get(k, float('nan')):.3f}" for k in kinds], f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                 f"{r['selection']['train_by_kind'].get('brightfield', float('nan')):.3f}", r["decision"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(result: dict) -> str:
    return f"# CellFinder-lite levers: DSB2018 val split ({result['images']['val']} images), box F1@0.5 per image\n\n" + table(result)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("detector-levers", args.out, "detector_levers", lambda: measure(args), render)


if __name__ == "__main__":
    sys.exit(main())
