"""README tables come from committed benchmark results: the default-model speed table and the
`make bench` table in README are exactly what bench/speed_default.py and bench/serving.py render
from the committed bench/speed_default.json and bench/results.json; the accuracy, detector-lever
and CellSeg1 tables likewise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.speed_default import markdown

ROOT = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> str:
    """The README text between ``<!-- name -->`` and ``<!-- /name -->``."""
    found = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", (ROOT / "README.md").read_text(), re.S)
    assert found, f"README has no <!-- {name} --> block"
    return found.group(1)


def test_speed_table_is_the_committed_run() -> None:
    result = json.loads((ROOT / "bench" / "speed_default.json").read_text())
    rendered = markdown(result).split("\n", 2)[2]  # without its "# ..." heading
    assert readme_block("speed_default").strip() == rendered.strip()
    assert (ROOT / "bench" / "speed_default.md").read_text() == markdown(result)
    assert result["machine"]["git_commit"] != "unknown" and result["images"] >= 1


def test_serving_table_is_the_committed_run() -> None:
    from bench.serving import markdown as serving_markdown

    result = json.loads((ROOT / "bench" / "results.json").read_text())
    rendered = serving_markdown(result).split("\n", 2)[2]  # without its "# ..." heading
    assert readme_block("serving").strip() == rendered.strip()
    assert (ROOT / "bench" / "results.md").read_text() == serving_markdown(result)
    assert result["machine"]["git_commit"] != "unknown" and result["decode"]["factors"]


@pytest.mark.parametrize("block, folder", [("accuracy", "bench"), ("accuracy_tta", "bench/tta")])
def test_accuracy_tables_are_the_committed_runs(block: str, folder: str) -> None:
    """The main `make bench-accuracy` table and the test-time flips run (``--tta 2 --tta 4``)."""
    from bench.accuracy import markdown_table

    result = json.loads((ROOT / folder / "accuracy.json").read_text())
    assert readme_block(block).strip() == markdown_table(result).strip()
    assert (ROOT / folder / "accuracy.md").read_text().split("\n", 2)[2] == markdown_table(result)
    assert result["images"] == len(next(iter(result["per_image"].values())))


def test_detector_levers_table_is_the_committed_run() -> None:
    from bench.detector_levers import render

    result = json.loads((ROOT / "bench" / "detector_levers.json").read_text())
    assert readme_block("detector_levers").strip() == render(result).split("\n", 2)[2].strip()
    assert (ROOT / "bench" / "detector_levers.md").read_text() == render(result)
    committed = json.loads((ROOT / "export" / "weights" / "cellfinder_lite.json").read_text())
    measured = {r["weights_sha256"]: r for r in result["rows"]}
    assert committed["weights_sha256"] in measured  # the committed detector is a measured row
    assert result["rows"][0]["decision"] == "reference" and all(r["decision"] in ("better", "not better") for r in result["rows"][1:])


def test_cellseg1_table_is_the_committed_run() -> None:
    """The CellSeg1 done-when table in README is bench/cellseg1.md's (make bench-cellseg1)."""
    committed = (ROOT / "bench" / "cellseg1.md").read_text()
    table = "\n".join(line for line in committed.splitlines() if line.startswith("|"))
    assert readme_block("cellseg1").strip() == table and table.count("\n") >= 3
