"""README tables come from committed benchmark results: the default-model speed table and the
`make bench` table in README are exactly what bench/speed_default.py and bench/serving.py render
from the committed bench/speed_default.json and bench/results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
