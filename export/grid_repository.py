"""Repository pieces for point prompts: ``<family>_point_decoder`` and ``<family>_grid``.

Every SAM-family export serves them (the default model, CellSAM, CellSeg1); a family whose grid
decodes on embedding windows (``grid.window``) also serves ``<family>_roi_point_decoder``. Rendered with
export/repository.py's public helpers: the point decoder is an ONNX model like the box decoder
(role "point_decoder": its own TensorRT profile on the point axis), the grid pipeline a Python BLS
like the box pipeline (role "pipeline", so its config carries the family). :func:`write_served`
writes every config of a family, leaving out the detector of a detector-free family
(``detector == "none"``).
"""

from __future__ import annotations

from pathlib import Path

from cellsam_triton.contracts import Family, ModelSpec

from .repository import PIPELINE_GLUE, RUNNER_GLUE, GpuOptions, family_roles, write_models

GRID_GLUE = ("grid_pipeline.py", "grid_generator.py", "grid_masks.py", "raster.py", "roi_windows.py", "bls.py", "request_checks.py",
             "contracts.py")  # bls.py: the base shared with the box pipeline


def grid_roles(family: Family) -> list[tuple[str, ModelSpec]]:
    """(role, spec) of the models that add point and grid prompts to a family: the point decoder,
    with ``grid.window`` the window point decoder, and the grid pipeline."""
    window = [("roi_point_decoder", family.roi_point_decoder())] if family.grid.window > 0 else []
    return [("point_decoder", family.point_decoder()), *window, ("pipeline", family.grid_pipeline())]


def served_roles(family: Family) -> list[tuple[str, ModelSpec]]:
    """(role, spec) of every model a family serves with point and grid prompts (no detector if it has none)."""
    base = [(r, s) for r, s in family_roles(family) if not (r == "detector" and family.detector == "none")]
    return base + grid_roles(family)


def _glue(role: str, spec: ModelSpec, family: Family, target: str) -> tuple[str, ...]:
    if role == "pipeline":
        return GRID_GLUE if spec.name == family.grid_name else PIPELINE_GLUE
    return RUNNER_GLUE if target == "cpu" else ()


def write_grid(
    repo_dir: str | Path, family: Family, target: str, threads: int | None = None, gpu: GpuOptions | None = None
) -> list[Path]:
    """Configs and glue of ``<family>_point_decoder`` and ``<family>_grid`` (ONNX written elsewhere)."""
    return write_models(repo_dir, grid_roles(family), family, target, threads, gpu, _glue)


def write_served(
    repo_dir: str | Path, family: Family, target: str, threads: int | None = None, gpu: GpuOptions | None = None
) -> list[Path]:
    """Configs and glue of every model in :func:`served_roles`."""
    return write_models(repo_dir, served_roles(family), family, target, threads, gpu, _glue)
