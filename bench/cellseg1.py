"""`make bench-cellseg1`: CellSeg1 on the DSB2018 validation split, every method in one table.

1. the served default model (LiteMedSAM + CellFinder-lite, detector boxes),
2. grid prompts, no fine-tuning (``export --model cellseg1`` without adapters: LiteMedSAM with
   the default model's point decoder, the base `finetune` starts from, served with the grid
   thresholds chosen on train for it),
3. grid prompts after one-image fine-tuning, one row per ``--training-kinds`` kind
   (``cellsam-triton finetune`` on the training image of that kind chosen by :func:`training_image`,
   its step count chosen among ``--epochs`` on other train images of the kind, bench/cellseg1_steps.py;
   exported with ``export --model cellseg1 --lora``), with the
   grid thresholds `finetune` recorded (export/grid_calibration.py: the base decoder's, kept;
   what ``export --lora`` serves by default); ``--extra-iou-threshold 0.8`` adds CellSeg1's own.

The report states each fine-tuning gain (a row 3 minus row 2), overall and by kind.

Each method runs on its own embedded tritonserver (one after the other). Writes
``cellseg1.json`` (summaries, per-image rows, the training record) and ``cellseg1.md`` (table).

    python -m bench.cellseg1 --repository build/repository --data ../shared/data/dsb2018 [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from cellsam_triton.client.evaluate import evaluate, select, served_predict, summary
from cellsam_triton.errors import UserError

from .cellseg1_steps import choose_epochs, epochs_list, selection_sentence, tuned_candidate
from .report import positive, run_bench

from .accuracy import SPLIT, markdown_table

HERE = Path(__file__).resolve().parent
WORK = Path("build/cellseg1")
TRAINING_SIZES = {"fluorescence": (256, 256), "stained": (256, 320)}  # the most common size of each kind in DSB


def training_rule(kind: str = "fluorescence") -> str:
    """The fine-tuning image rule for ``kind``, in words."""
    height, width = TRAINING_SIZES[kind]
    return f"train split, {kind}, {height}x{width}, most annotated nuclei (manifest `objects`); ties: smallest id"


def training_kinds(text: str) -> list[str]:
    """``--training-kinds`` parsed: known kinds, comma-separated, each once."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TRAINING_SIZES]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"expected kinds from {', '.join(TRAINING_SIZES)}, comma-separated, each once; got {text!r}")
    return kinds


def training_image(data: Path, kind: str = "fluorescence") -> str:
    """The id of the one fine-tuning image (:func:`training_rule`); never a validation image."""
    from cellsam_triton.datasets import load_manifest, split_of

    size = TRAINING_SIZES[kind]
    pool = [r for r in load_manifest(data) if split_of(r.id) == "train" and r.kind == kind and (r.height, r.width) == size]
    if not pool:
        raise UserError(f"no {size[0]}x{size[1]} {kind} training image in {data}")
    return min(pool, key=lambda r: (-r.objects, r.id)).id


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/repository"), help="exported default model repository")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="DSB-layout folder")
    parser.add_argument("--work", type=Path, default=WORK, help="adapter file and CellSeg1 repositories (default %(default)s)")
    parser.add_argument("--lora", type=Path, default=None, help="use this adapter file instead of fine-tuning (one --training-kinds)")
    parser.add_argument("--scores", type=Path, default=None, metavar="DIR",
                        help="per-image score checkpoints, reused by a rerun (default: <work>/scores)")
    parser.add_argument("--epochs", type=epochs_list, default=[30, 45, 60], metavar="N[,N...]",
                        help="fine-tuning steps; several: each fine-tuned, the best on --select-images train images of the "
                             "kind is the row's (bench/cellseg1_steps.py; default 30,45,60)")
    parser.add_argument("--select-images", type=positive, default=16, metavar="K",
                        help="train images of each kind the step count is chosen on (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=None, help="fine-tuning prompts per step (default: finetune's)")
    parser.add_argument("--encoder-lora", action="store_true", help="fine-tune with encoder LoRA too (slower)")
    parser.add_argument("--training-kinds", type=training_kinds, default=list(TRAINING_SIZES), metavar="K[,K]",
                        help="one fine-tuned row per kind, each on its own training image (default: fluorescence,stained)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N validation images only")
    parser.add_argument("--points-per-side", type=int, default=None, metavar="N", help="grid points per side (default: the model's)")
    parser.add_argument("--extra-iou-threshold", type=float, default=None, metavar="T",
                        help="also score the fine-tuned model with predicted-IoU threshold T (an extra, labelled row)")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per request (default %(default)s)")
    return parser.parse_args(argv)


def finetune(data: Path, sample_id: str, out: Path, settings: dict, rule: str) -> dict:
    """Fine-tune on one DSB sample (in process, same code as `cellsam-triton finetune`); its provenance."""
    import numpy as np
    import torch

    from cellsam_triton.datasets import load_sample, sample_path
    from cellsam_triton.export.finetune import FinetuneConfig, finetune_arrays, provenance_path, write_provenance_fields
    from cellsam_triton.export.training import sha256_file

    image, labels = load_sample(data, sample_id)
    config = FinetuneConfig(**{k: v for k, v in settings.items() if v is not None})
    adapters, record = finetune_arrays(image, np.asarray(labels), config)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(adapters, out)
    provenance = {
        "command": f"python -m bench.cellseg1 (finetune_arrays on {sample_id})",
        "image": str(sample_path(data, sample_id)), "image_sha256": sha256_file(sample_path(data, sample_id)),
        "training_rule": rule,
        **write_provenance_fields(config, record, out),
    }
    provenance_path(out).write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def calibrate(data: Path, sample_id: str, lora: Path) -> dict:
    """`finetune`'s grid calibration of an existing adapter on its training image (in process)."""
    from cellsam_triton.contracts import CELLSEG1_LITE
    from cellsam_triton.datasets import load_sample
    from cellsam_triton.export.cellseg1_export import load_lite_base
    from cellsam_triton.export.grid_calibration import calibrate as calibrate_grid

    image, labels = load_sample(data, sample_id)
    encoder, decoder = load_lite_base(lora)
    return calibrate_grid(encoder, decoder, CELLSEG1_LITE, image, labels)


def export_key(lora: Path | None) -> str:
    """The export stamp of a CellSeg1 repository: its weights' sha256 and the family rules' hash."""
    import hashlib

    from cellsam_triton.contracts import CELLSEG1_LITE
    from cellsam_triton.export.cellseg1_export import base_decoder_weights
    from cellsam_triton.export.training import sha256_file

    weights = sha256_file(base_decoder_weights("points") if lora is None else lora)
    return f"{'base' if lora is None else 'lora'}:{weights}|{hashlib.sha256(repr(CELLSEG1_LITE).encode()).hexdigest()[:12]}"


def export(repository: Path, lora: Path | None) -> Path:
    """``export --model cellseg1 [--lora]`` (LiteMedSAM base, its served grid thresholds) into
    ``repository``, unless done for these weights and family rules; other thresholds are sent per request."""
    from cellsam_triton.cli import main as cli

    stamp = repository / ".cellseg1_exported"
    key = export_key(lora)
    if stamp.is_file() and stamp.read_text().strip() == key:
        return repository
    argv = ["export", "--model", "cellseg1", "--repository", str(repository), "--target", "cpu"]
    if cli(argv + ([] if lora is None else ["--lora", str(lora)])) != 0:
        raise UserError(f"export of {repository} failed")
    stamp.write_text(key + "\n")
    return repository


def served_thresholds(repository: Path) -> str:
    """The grid thresholds ``repository`` serves (its ``cellseg1_lite_grid`` config), as a row label."""
    from cellsam_triton.contracts import CELLSEG1_LITE
    from cellsam_triton.export.repository import parse_config

    config = parse_config(repository / CELLSEG1_LITE.grid_pipeline().name / "config.pbtxt")
    rules = json.loads(config.parameters["family"].string_value)["grid"]
    return f"pred-IoU >= {rules['pred_iou_threshold']:g}, stability >= {rules['stability_threshold']:g}"


def model_key(repository: Path) -> str:
    """What identifies an exported repository's models: its export stamp's content (weights' sha256
    and family rules, wherever the repository lies), else the folder and the stamp's time."""
    for name in (".cellseg1_exported", ".exported"):
        stamp = repository / name
        if stamp.is_file():
            return stamp.read_text().strip() or f"{repository}:{stamp.stat().st_mtime_ns}"
    return str(repository)


def load_checkpoint(path: Path, key: str) -> dict:
    """Scores already measured for ``key`` (one JSON line each, after a key line), by image id."""
    from dataclasses import fields

    from cellsam_triton.client.metrics import ImageScore

    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]).get("key") != key:
        return {}
    names = {f.name for f in fields(ImageScore)}
    scores = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when a run was stopped
            continue
        scores[row["id"]] = ImageScore(**{k: v for k, v in row.items() if k in names})
    return scores


def run_method(repository: Path, data: Path, records: list, desc: str, timeout: float, grid=None,
               checkpoint: Path | None = None) -> list:
    """Scores of one served model (its own embedded server, stopped afterwards).

    With ``checkpoint``, each image's score is appended there as it is measured and images
    already there (same model and grid settings) are not run again: a stopped run resumes.
    """
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.server import EmbeddedServer

    if not repository.is_dir():
        raise UserError(f"model repository {repository} not found; run `make export` first")
    key = f"{model_key(repository)}|{grid!r}"
    done = load_checkpoint(checkpoint, key) if checkpoint is not None else {}
    todo = [r for r in records if r.id not in done]
    if not todo:
        return [done[r.id] for r in records]
    with contextlib.ExitStack() as stack:
        on_score = None
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(checkpoint.open("a" if done else "w"))
            if not done:
                log.write(json.dumps({"key": key}) + "\n")

            def on_score(score):
                log.write(json.dumps(score.as_dict()) + "\n")
                log.flush()
        server = stack.enter_context(EmbeddedServer(repository))
        segmenter = stack.enter_context(Segmenter(server.grpc_url, timeout_s=timeout))
        for score in evaluate(data, todo, served_predict(segmenter, None, grid), desc, on_score):
            done[score.id] = score
    return [done[r.id] for r in records]


def tuned_adapter(args: argparse.Namespace, kind: str, records: list, base: Path, grid) -> tuple[str, Path, dict, dict | None]:
    """(training image id, adapter file, its provenance, the step-count selection or None) of ``kind``'s row:
    ``--lora``, else the one ``--epochs`` count, else the count chosen on train images (fine-tuned unless there)."""
    from cellsam_triton.export.finetune import provenance_path, read_provenance

    sample_id = training_image(args.data, kind)
    if sample_id in {r.id for r in records}:
        raise UserError(f"training image {sample_id} is in the validation split")
    selection = None
    if args.lora is not None:
        lora = args.lora
        provenance = read_provenance(lora) or {"adapter": str(lora)}
    else:
        if len(args.epochs) > 1:
            epochs, selection = choose_epochs(args, kind, sample_id, base, grid)
        else:
            epochs = args.epochs[0]
        lora, provenance = tuned_candidate(args, kind, sample_id, epochs)
    if "grid" not in provenance:  # an adapter trained before finetune calibrated: calibrate it now
        provenance["grid"] = calibrate(args.data, sample_id, lora)
        if provenance_path(lora).is_file():
            provenance_path(lora).write_text(json.dumps(provenance, indent=2) + "\n")
    return sample_id, lora, provenance, selection


def measure(args: argparse.Namespace) -> dict:
    """Fine-tune (unless ``--lora``) on one image of each kind, export, and score every method."""
    from cellsam_triton.client.grid_rules import GridOptions
    from cellsam_triton.contracts import CELLSEG1_LITE, LITE
    from cellsam_triton.datasets import data_checksum

    if args.lora is not None and len(args.training_kinds) != 1:
        raise UserError("--lora names one adapter: give one kind with --training-kinds")
    records = select(args.data, SPLIT, args.limit)
    base = export(args.work / "base_repository", None)
    grid = GridOptions(points_per_side=args.points_per_side)  # the served thresholds
    side = args.points_per_side or CELLSEG1_LITE.grid.points_per_side
    scores = args.scores or args.work / "scores"
    before = f"grid {side}x{side}, no fine-tuning (point decoder; {served_thresholds(base)})"
    runs = {
        f"{LITE.name} (detector boxes)":
            run_method(args.repository, args.data, records, LITE.name, args.timeout, None, scores / "default.jsonl"),
        before: run_method(base, args.data, records, "grid base", args.timeout, grid, scores / "grid_base.jsonl"),
    }
    tuned = {}
    for kind in args.training_kinds:
        sample_id, lora, provenance, selection = tuned_adapter(args, kind, records, base, grid)
        steps = provenance.get("config", {}).get("epochs")
        tag = "" if args.lora is not None else f"_epochs{steps}"  # a given adapter, else the fine-tuned one of that step count
        repository = export(args.work / f"tuned_{kind}{tag}_repository", lora)
        after = (f"grid {side}x{side}, fine-tuned on one {kind} image{f', {steps} steps' if steps else ''} "
                 f"({served_thresholds(repository)})")
        runs[after] = run_method(repository, args.data, records, f"grid tuned ({kind})", args.timeout, grid,
                                 scores / f"grid_tuned_{kind}{tag}.jsonl")
        if args.extra_iou_threshold is not None:
            loose = GridOptions(points_per_side=args.points_per_side, pred_iou_threshold=args.extra_iou_threshold)
            name = f"grid {side}x{side}, fine-tuned on one {kind} image (pred-IoU >= {args.extra_iou_threshold:g}, --extra-iou-threshold)"
            runs[name] = run_method(repository, args.data, records, f"grid tuned loose ({kind})", args.timeout, loose,
                                    scores / f"grid_tuned_{kind}_loose.jsonl")
        gain = finetune_gain(summary(runs[before]), summary(runs[after]))
        tuned[kind] = {"training_image": sample_id, "training_rule": training_rule(kind), "finetune": provenance,
                       "gain": {**gain, "stderr": paired_stderr(runs[before], runs[after])}, "selection": selection}
    return {
        "split": SPLIT,
        "images": len(records),
        "data_checksum": data_checksum(args.data, [r.id for r in records]),
        "tuned": tuned,
        "methods": {name: summary(scores) for name, scores in runs.items()},
        "per_image": {name: [s.as_dict() for s in scores] for name, scores in runs.items()},
    }


def finetune_gain(before: dict, after: dict) -> dict:
    """Per-image F1 of the fine-tuned grid minus the grid without fine-tuning (two ``summary``
    results), overall and by kind."""
    kinds = [k for k in after["by_kind"] if k in before["by_kind"]]
    return {"before": before["f1_mean"], "after": after["f1_mean"], "f1_mean": after["f1_mean"] - before["f1_mean"],
            "by_kind": {k: after["by_kind"][k]["f1_mean"] - before["by_kind"][k]["f1_mean"] for k in kinds}}


def paired_stderr(before: list, after: list) -> float:
    """Standard error of the mean per-image F1 difference (same images, same order): the noise a
    gain must clear."""
    import numpy as np

    diff = np.array([a.f1 - b.f1 for b, a in zip(before, after, strict=True)])
    return float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def gain_sentence(gain: dict, kind: str = "fluorescence") -> str:
    """The report's sentence on :func:`finetune_gain` of the row fine-tuned on one ``kind`` image."""
    kinds = ", ".join(f"{k} {v:+.3f}" for k, v in gain["by_kind"].items())
    noise = f", paired standard error {gain['stderr']:.3f}" if "stderr" in gain else ""
    return (f"Fine-tuning on one {kind} image changes grid per-image F1@0.5 by **{gain['f1_mean']:+.3f}** "
            f"({gain['before']:.3f} -> {gain['after']:.3f}; {kinds}{noise}).")


def report(result: dict) -> str:
    """The markdown of cellseg1.md: table and how it was made."""
    lines = [f"# CellSeg1 on DSB2018 {result['split']} split ({result['images']} images)", "", markdown_table(result).rstrip("\n")]
    for kind, row in result["tuned"].items():
        ft = row["finetune"]
        seconds = ft.get("seconds")
        lines += ["", f"Fine-tuning image ({kind}): `{row['training_image']}` ({row['training_rule']}); "
                  + (f"{ft['config']['epochs']} epochs in {seconds:.0f} s, loss {ft['loss_first']:.3f} -> {ft['loss_last']:.3f}."
                     if seconds is not None else "adapter file given.")]
        if row.get("selection"):
            lines += ["", selection_sentence(row["selection"])]
        lines += ["", gain_sentence(row["gain"], kind)]
        grid = ft.get("grid")
        if grid and "training_f1_by_threshold" in grid:
            f1 = ", ".join(f"{t}: {v:.3f}" for t, v in grid["training_f1_by_threshold"].items())
            lines += ["", f"Served grid threshold: {grid['rule']}; F1 on the training image by threshold: {f1}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench-cellseg1", args.out, "cellseg1", lambda: measure(args), report)


if __name__ == "__main__":
    sys.exit(main())
