"""bench.cellseg1: the fine-tuning image rule, the resumable per-image checkpoints and the
fine-tuning gain the report states."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.cellseg1 import (TRAINING_SIZES, export_key, finetune_gain, gain_sentence, load_checkpoint, model_key, paired_stderr,
                            report, run_method, training_image, training_kinds, training_rule)
from bench.cellseg1_steps import (adapter_path, choose, choose_epochs, epochs_list, selection_images, selection_sentence,
                                  tuned_candidate)
from bench.report import positive
from cellsam_triton.client.metrics import ImageScore
from cellsam_triton.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"


def _write(path: Path, key: str, scores: list[ImageScore], tail: str = "") -> None:
    lines = [json.dumps({"key": key})] + [json.dumps(s.as_dict()) for s in scores]
    path.write_text("\n".join(lines) + "\n" + tail)


def test_checkpoint_round_trip_ignores_cut_lines_and_other_keys(tmp_path):
    scores = [ImageScore(3, 1, 2, 2.4, id="a", kind="fluorescence", seconds=1.5), ImageScore(0, 0, 4, 0.0, id="b")]
    path = tmp_path / "scores.jsonl"
    _write(path, "k1", scores, tail='{"tp": 1, "fp"')  # last line cut short by a stopped run
    loaded = load_checkpoint(path, "k1")
    assert list(loaded) == ["a", "b"]
    assert loaded["a"] == scores[0] and loaded["b"] == scores[1]
    assert load_checkpoint(path, "k2") == {}  # another model or other grid settings
    assert load_checkpoint(tmp_path / "missing.jsonl", "k1") == {}


def test_model_key_follows_the_export_stamp(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".cellseg1_exported").write_text("abc\n")
    first = model_key(repo)
    (repo / ".cellseg1_exported").write_text("def\n")
    assert model_key(repo) != first and model_key(repo) == "def"
    moved = tmp_path / "elsewhere"
    repo.rename(moved)
    assert model_key(moved) == "def"  # the weights, not the folder, key the scores
    (moved / ".cellseg1_exported").write_text("")
    assert model_key(moved).startswith(f"{moved}:")  # no content: folder and time


def test_finished_checkpoint_is_reused_without_a_server(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".cellseg1_exported").write_text("base\n")
    records = [SimpleNamespace(id="b"), SimpleNamespace(id="a")]
    scores = [ImageScore(1, 0, 0, 0.9, id="a"), ImageScore(2, 1, 0, 1.5, id="b")]
    path = tmp_path / "scores.jsonl"
    _write(path, f"{model_key(repo)}|None", scores)
    # every image is done: no tritonserver is started, scores come back in record order
    assert [s.id for s in run_method(repo, tmp_path, records, "t", 1.0, None, path)] == ["b", "a"]


@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason=f"DSB2018 data not found at {DATA}")
@pytest.mark.parametrize("kind", ["fluorescence", "stained"])
def test_training_image_rule_picks_a_train_image(kind: str):
    from cellsam_triton.datasets import load_manifest, split_of

    chosen = training_image(DATA, kind)
    records = {r.id: r for r in load_manifest(DATA)}
    assert split_of(chosen) == "train"
    record = records[chosen]
    assert record.kind == kind and (record.height, record.width) == TRAINING_SIZES[kind]
    peers = [r for r in records.values() if split_of(r.id) == "train" and r.kind == kind
             and (r.height, r.width) == TRAINING_SIZES[kind]]
    assert record.objects == max(r.objects for r in peers) and len(peers) > 1
    assert kind in training_rule(kind)


def test_report_states_the_fine_tuning_gain_by_kind():
    def row(f1, fluo, stained):
        return {"f1_mean": f1, "by_kind": {"fluorescence": {"f1_mean": fluo}, "stained": {"f1_mean": stained}}}

    gain = finetune_gain(row(0.70, 0.75, 0.40), row(0.72, 0.80, 0.30))
    assert gain["f1_mean"] == pytest.approx(0.02) and gain["by_kind"]["stained"] == pytest.approx(-0.10)
    assert "by **+0.020** (0.700 -> 0.720; fluorescence +0.050, stained -0.100)" in gain_sentence(gain)
    lost = finetune_gain(row(0.70, 0.75, 0.40), row(0.60, 0.65, 0.30))
    assert "one stained image changes grid per-image F1@0.5 by **-0.100**" in gain_sentence(lost, "stained")
    scores = [SimpleNamespace(f1=f) for f in (0.5, 0.7, 0.9)]
    moved = [SimpleNamespace(f1=f) for f in (0.6, 0.7, 0.8)]  # differences +0.1, 0, -0.1
    assert paired_stderr(scores, moved) == pytest.approx(0.1 / 3 ** 0.5)
    assert "stained -0.100, paired standard error 0.058)" in gain_sentence({**lost, "stderr": paired_stderr(scores, moved)})
    provenance = {"seconds": 12.0, "config": {"epochs": 60}, "loss_first": 0.5, "loss_last": 0.4}
    result = {"split": "val", "images": 2, "methods": {},
              "tuned": {kind: {"training_image": f"id-{kind}", "training_rule": training_rule(kind), "finetune": provenance,
                               "gain": g} for kind, g in (("fluorescence", gain), ("stained", lost))}}
    text = report(result)
    assert "Fine-tuning image (stained): `id-stained`" in text and "one fluorescence image changes" in text
    assert "by **-0.100**" in text and "by **+0.020**" in text and "Step count chosen" not in text
    result["tuned"]["stained"]["selection"] = {"rule": "r", "images": ["x", "y"], "f1_mean": {"30": 0.5, "60": 0.4},
                                               "base_f1_mean": 0.45, "chosen": 30}
    assert "Step count chosen on 2 train images (r), grid per-image F1@0.5: 30 steps 0.500, 60 steps 0.400" in report(result)


def test_training_kinds_argument():
    assert training_kinds("stained, fluorescence") == ["stained", "fluorescence"]
    for bad in ("", "brightfield", "stained,stained"):
        with pytest.raises(argparse.ArgumentTypeError):
            training_kinds(bad)


def test_epochs_argument():
    assert epochs_list("30,45,60") == [30, 45, 60] and epochs_list("60") == [60]
    for bad in ("", "60,30", "30,30", "0,30", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            epochs_list(bad)
    assert choose({30: 0.70, 45: 0.72, 60: 0.71}) == 45
    assert choose({30: 0.72, 60: 0.72}) == 30  # ties: fewer steps


def _candidate(work: Path, kind: str, sample_id: str, epochs: int) -> Path:
    from cellsam_triton.export.finetune import provenance_path

    lora = adapter_path(work, kind, epochs)
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(f"adapter {epochs}".encode())
    provenance_path(lora).write_text(json.dumps({"image": f"images/{sample_id}.npz", "config": {"epochs": epochs}}))
    return lora


def _exported(repository: Path, lora: Path | None) -> str:
    repository.mkdir(parents=True)
    (repository / ".cellseg1_exported").write_text(export_key(lora) + "\n")
    return model_key(repository)


@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason=f"DSB2018 data not found at {DATA}")
def test_step_count_is_chosen_on_other_train_images(tmp_path):
    """Each candidate's adapter and scores are already there (as a resumed run finds them): the
    count with the best F1 on the selection images is chosen, and nothing from validation is read."""
    from cellsam_triton.client.grid_rules import GridOptions
    from cellsam_triton.datasets import load_manifest, split_of

    kind, grid = "stained", GridOptions()
    sample_id = training_image(DATA, kind)
    images = selection_images(DATA, kind, sample_id, 3)
    records = {r.id: r for r in load_manifest(DATA)}
    assert [r.id for r in images] == sorted(r.id for r in images) and sample_id not in {r.id for r in images}
    assert all(split_of(r.id) == "train" and records[r.id].kind == kind for r in images)
    args = SimpleNamespace(data=DATA, work=tmp_path, scores=None, epochs=[30, 60], select_images=3, prompts=None,
                           encoder_lora=False, timeout=1.0)
    counts = {30: (3, 2, 2), 60: (4, 1, 1), "base": (2, 3, 3)}  # (tp, fp, fn) on every selection image
    for epochs in (30, 60):
        key = _exported(tmp_path / f"tuned_{kind}_epochs{epochs}_repository", _candidate(tmp_path, kind, sample_id, epochs))
        (tmp_path / "scores").mkdir(exist_ok=True)
        _write(tmp_path / "scores" / f"select_{kind}_epochs{epochs}.jsonl", f"{key}|{grid!r}",
               [ImageScore(*counts[epochs], 1.0, id=r.id) for r in images])
    base = tmp_path / "base_repository"
    _write(tmp_path / "scores" / f"select_{kind}_base.jsonl", f"{_exported(base, None)}|{grid!r}",
           [ImageScore(*counts["base"], 1.0, id=r.id) for r in images])
    chosen, record = choose_epochs(args, kind, sample_id, base, grid)
    assert chosen == 60 and record["chosen"] == 60 and record["images"] == [r.id for r in images]
    assert record["f1_mean"] == {"30": pytest.approx(0.6), "60": pytest.approx(0.8)} and record["base_f1_mean"] == pytest.approx(0.4)
    text = selection_sentence(record)
    assert "30 steps 0.600, 60 steps 0.800 (no fine-tuning 0.400): **60 steps**" in text and "3 train images" in text
    # an adapter file whose provenance names another step count is refused, not reused
    _candidate(tmp_path, kind, sample_id, 45)
    (tmp_path / f"lora_{kind}_epochs45.pth").rename(adapter_path(tmp_path, kind, 60))
    (tmp_path / f"lora_{kind}_epochs45.json").rename(tmp_path / f"lora_{kind}_epochs60.json")
    with pytest.raises(UserError, match="not a 60-step adapter"):
        tuned_candidate(args, kind, sample_id, 60)
    with pytest.raises(UserError, match="other stained training images"):
        selection_images(DATA, kind, sample_id, 10_000)


def test_candidate_trained_with_other_settings_is_refused(tmp_path):
    args = SimpleNamespace(data=tmp_path, work=tmp_path, prompts=4, encoder_lora=False)
    _candidate(tmp_path, "stained", "abc", 30)  # provenance without prompts=4
    with pytest.raises(UserError, match="with these settings"):
        tuned_candidate(args, "stained", "abc", 30)
    assert tuned_candidate(SimpleNamespace(**{**vars(args), "prompts": None}), "stained", "abc", 30)[0].is_file()
    with pytest.raises(argparse.ArgumentTypeError):
        positive("0")
    assert positive("16") == 16
