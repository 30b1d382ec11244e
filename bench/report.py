"""What every benchmark here shares: the machine and git commit a run was made on, its results
written as JSON (committed, so that README tables trace to a run) plus Markdown, and a ``main``
that turns a :class:`UserError` into one line and its exit code."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from cellsam_triton.client.evaluate import write_json
from cellsam_triton.errors import UserError

HERE = Path(__file__).resolve().parent


def positive(text: str) -> int:
    """An argparse type: a positive count (of images, steps, ...)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return int(text)


def machine() -> dict:
    """CPU, cores, load, library versions, git commit (and whether the tree had local changes), date."""
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, check=True).stdout.strip()
        results = [f":(top,exclude)bench/*.{suffix}" for suffix in ("json", "md", "png")]  # a run's own outputs
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *results],
                                    capture_output=True, text=True, cwd=HERE).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "load_average_start": os.getloadavg()[0],
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "git_commit": commit, "git_dirty": dirty, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(out: Path, stem: str, result: dict, markdown: str) -> list[Path]:
    """``OUT/STEM.json`` (with ``machine`` added when the result has none) and ``OUT/STEM.md``."""
    result.setdefault("machine", machine())
    out = Path(out)
    write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown)
    return [out / f"{stem}.json", out / f"{stem}.md"]


def run_bench(name: str, out: Path, stem: str, measure: Callable[[], dict], render: Callable[[dict], str]) -> int:
    """``measure`` a result, ``render`` it as markdown, write ``OUT/STEM.{json,md}`` and print it
    (a UserError: one line on stderr and its exit code)."""

    def work() -> tuple[str, list[Path]]:
        result = measure()
        text = render(result)
        return text, write_results(out, stem, result, text)

    return run_main(name, work)


def run_main(name: str, work: Callable[[], tuple[str, list[Path]]]) -> int:
    """Run ``work`` (it measures, writes its files and returns the text to print and the files
    written); a UserError is one line on stderr and its exit code."""
    try:
        text, written = work()
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
