"""The fine-tuning step count of `make bench-cellseg1`, chosen on train images, never on validation.

One image is too small a judge of its own adapter (early stopping on a held-out part of it kept
the base), so each candidate count is fine-tuned on the row's training image and scored, served
with grid prompts, on other images of the same kind from the train split (:func:`selection_images`);
the count with the best per-image F1@0.5 there is the row's (ties: fewer steps). Caveat, stated
in the report: the base decoder was trained on the whole train split, these images included, so
this judge leans towards adapters close to the base (fewer steps), never towards validation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cellsam_triton.errors import UserError

SELECTION_RULE = "train split, same kind, not the training image, first {count} by id (ids are content hashes)"


def epochs_list(text: str) -> list[int]:
    """``--epochs`` parsed: one step count, or several (comma-separated, ascending, positive) to choose from."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected positive step counts, comma-separated, ascending, each once; got {text!r}")
    return values


def selection_images(data: Path, kind: str, training_id: str, count: int) -> list:
    """The manifest records the step count is chosen on (:data:`SELECTION_RULE`)."""
    from cellsam_triton.datasets import load_manifest, split_of

    pool = sorted((r for r in load_manifest(data) if split_of(r.id) == "train" and r.kind == kind and r.id != training_id),
                  key=lambda r: r.id)
    if len(pool) < count:
        raise UserError(f"only {len(pool)} other {kind} training images in {data}; asked to choose on {count}")
    return pool[:count]


def adapter_path(work: Path, kind: str, epochs: int) -> Path:
    """Where the adapter fine-tuned for ``epochs`` steps on ``kind``'s training image is kept."""
    return work / f"lora_{kind}_epochs{epochs}.pth"


def tuned_candidate(args: argparse.Namespace, kind: str, sample_id: str, epochs: int) -> tuple[Path, dict]:
    """(adapter file, provenance) for ``epochs`` steps: fine-tuned unless the file is there (then its
    provenance must say the same training image, step count and given settings)."""
    from cellsam_triton.export.finetune import provenance_path, read_provenance

    from .cellseg1 import finetune, training_rule

    lora = adapter_path(args.work, kind, epochs)
    settings = {"epochs": epochs, "prompts": args.prompts, "encoder_lora": True if args.encoder_lora else None}
    if not lora.is_file():
        return lora, finetune(args.data, sample_id, lora, settings, training_rule(kind))
    provenance = read_provenance(lora)
    config = provenance.get("config", {})
    if any(config.get(k) != v for k, v in settings.items() if v is not None) or sample_id not in provenance.get("image", ""):
        raise UserError(f"{lora} is not a {epochs}-step adapter of {sample_id} with these settings "
                        f"(its provenance {provenance_path(lora)} says otherwise); remove it")
    return lora, provenance


def choose(scores: dict[int, float]) -> int:
    """The step count with the best mean F1 (ties: the fewest steps)."""
    return max(scores, key=lambda epochs: (scores[epochs], -epochs))


def choose_epochs(args: argparse.Namespace, kind: str, sample_id: str, base: Path, grid) -> tuple[int, dict]:
    """Fine-tune every ``args.epochs`` count, score each (and the base) on the selection images;
    (the chosen count, the selection's record for the report)."""
    from cellsam_triton.client.evaluate import summary

    from .cellseg1 import export, run_method

    images = selection_images(args.data, kind, sample_id, args.select_images)
    scores = args.scores or args.work / "scores"

    def run(repository: Path, name: str) -> float:
        checkpoint = scores / f"select_{name}.jsonl"
        return summary(run_method(repository, args.data, images, f"select {name}", args.timeout, grid, checkpoint))["f1_mean"]

    f1 = {}
    for epochs in args.epochs:
        lora, _ = tuned_candidate(args, kind, sample_id, epochs)
        f1[epochs] = run(export(args.work / f"tuned_{kind}_epochs{epochs}_repository", lora), f"{kind}_epochs{epochs}")
    chosen = choose(f1)
    return chosen, {"rule": SELECTION_RULE.format(count=len(images)), "images": [r.id for r in images],
                    "f1_mean": {str(k): v for k, v in f1.items()}, "base_f1_mean": run(base, f"{kind}_base"), "chosen": chosen}


def selection_sentence(selection: dict) -> str:
    """The report's sentence on how the row's step count was chosen."""
    tried = ", ".join(f"{epochs} steps {f1:.3f}" for epochs, f1 in selection["f1_mean"].items())
    return (f"Step count chosen on {len(selection['images'])} train images ({selection['rule']}), grid per-image F1@0.5: "
            f"{tried} (no fine-tuning {selection['base_f1_mean']:.3f}): **{selection['chosen']} steps**. "
            "The base decoder was trained on these images, so this judge leans towards few steps; it never sees validation.")
