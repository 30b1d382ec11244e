"""Repository piece for clients in any language: ``<family>_labels`` (a raw image in, labels out).

A Python BLS model like the pipelines (export/repository.py renders its config, role "labels"),
whose glue runs the client's own rule code on the server. Besides its glue files
(``LABELS_GLUE``) the version folder gets the modules of the client path (``RULE_MODULES``)
copied from the installed package into ``<family>_labels/1/cellsam_triton/``, the same layout,
so their imports resolve unchanged inside Triton's Python backend: the server segments with the
files the CLI runs. ``cellsam-triton export`` writes it for every family.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from cellsam_triton.contracts import Family, ModelSpec

from .repository import GpuOptions, write_models

# first file becomes model.py; contracts.py (flat) is read by bls.py, the package copy by the rules
LABELS_GLUE = ("labels_model.py", "labels_request.py", "bls_transport.py", "bls.py", "request_checks.py", "contracts.py")
# What `api.segment_image` imports, for every rule set (a test imports them from a copy alone).
RULE_MODULES = (
    "cellsam_triton",
    "cellsam_triton.contracts",
    "cellsam_triton.errors",
    "cellsam_triton.client",
    "cellsam_triton.client.api",
    "cellsam_triton.client.transport",
    "cellsam_triton.client.types",
    "cellsam_triton.client.images",
    "cellsam_triton.client.labels",
    "cellsam_triton.client.tiles",
    "cellsam_triton.client.resize",
    "cellsam_triton.client.autoscale",
    "cellsam_triton.client.lite_rules",
    "cellsam_triton.client.cellsam_rules",
    "cellsam_triton.client.grid_rules",
    "cellsam_triton.client.points",
    "cellsam_triton.client.point_rules",
    "cellsam_triton.model_repository",
    "cellsam_triton.model_repository.raster",
    "cellsam_triton.model_repository.selection",
)
PACKAGE = "cellsam_triton"


def labels_roles(family: Family) -> list[tuple[str, ModelSpec]]:
    """(role, spec) of the one model this piece adds to a family."""
    return [("labels", family.labels_model())]


def rule_files() -> list[tuple[Path, Path]]:
    """(installed source file, path inside the version folder) of every module in RULE_MODULES."""
    files = []
    for name in RULE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise RuntimeError(f"module {name} not found; reinstall cellsam-triton")
        parts = Path(*name.split("."))
        relative = parts / "__init__.py" if spec.submodule_search_locations is not None else parts.with_suffix(".py")
        files.append((Path(spec.origin), relative))
    return files


def _glue(role: str, spec: ModelSpec, family: Family, target: str) -> tuple[str, ...]:
    return LABELS_GLUE


def write_labels(
    repo_dir: str | Path, family: Family, target: str, threads: int | None = None, gpu: GpuOptions | None = None
) -> list[Path]:
    """Config, glue and rule-code copy of ``<family>_labels`` under ``repo_dir``; the written files."""
    written = write_models(repo_dir, labels_roles(family), family, target, threads, gpu, _glue)
    version = Path(repo_dir) / family.labels_name / "1"
    shutil.rmtree(version / PACKAGE, ignore_errors=True)  # no stale module of an older export
    for source, relative in rule_files():
        destination = version / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        written.append(destination)
    return written
