"""Export a PyTorch module to ONNX and prove it: every declared input is a graph input, and
ONNX Runtime reproduces PyTorch on the example (and any extra input sets).

Parity rule: for each output, ``max|ort - torch| <= tolerance * max(1, max|torch|)``, i.e.
absolute for outputs of unit scale, relative for large ones (mask logits, embeddings).
Models over 2 GB keep their weights in one external file, ``model.onnx.data``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cellsam_triton.errors import UserError

log = logging.getLogger(__name__)

OPSET = 17


@dataclass
class ExportReport:
    """Outcome of one export: where it went and how closely ONNX Runtime matched PyTorch."""

    path: Path
    max_abs_error: dict[str, float]  # per output, over all checked input sets
    tolerance: float
    input_sets: int
    seconds: float
    output_scale: dict[str, float] = field(default_factory=dict)  # max |torch output|

    def __str__(self) -> str:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in self.max_abs_error.items())
        return (
            f"{self.path}: ONNX Runtime vs PyTorch max abs error {errors} "
            f"over {self.input_sets} input set(s) (tolerance {self.tolerance:g}), {self.seconds:.0f} s"
        )


def graph_inputs(path: str | os.PathLike) -> list[str]:
    """Names of the real inputs of an ONNX graph (initializers excluded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


def consolidate_external_data(path: Path) -> None:
    """Gather weights the exporter spread over many files into one ``<name>.data`` file."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    scattered = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    if not scattered:
        return
    model = onnx.load(str(path))
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    for name in scattered - {data}:
        (path.parent / name).unlink(missing_ok=True)


def _run_torch(module, inputs: dict) -> list:
    import torch

    with torch.no_grad():
        out = module(*inputs.values())
    return [t.detach().cpu().numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def export_onnx(
    module,
    example_inputs: dict,
    output_names: list[str],
    dynamic_axes: dict,
    path: str | os.PathLike,
    tolerance: float,
    check_inputs: list[dict] | None = None,
) -> ExportReport:
    """Export ``module`` (called as ``module(*example_inputs.values())``) to ``path``; verify it.

    ``dynamic_axes`` uses torch's form ({tensor name: {axis: name}}). ``check_inputs`` are
    extra input sets (e.g. another batch or box count) checked like the example.
    Raises ``UserError`` when an input was lost or an output is off by more than the tolerance.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    started = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    input_sets = [example_inputs] + list(check_inputs or [])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic traced as constants: expected
        torch.onnx.export(
            module,
            tuple(example_inputs.values()),
            str(path),
            input_names=list(example_inputs),
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    consolidate_external_data(path)

    found = graph_inputs(path)
    lost = [name for name in example_inputs if name not in found]
    if lost:
        raise UserError(f"ONNX export of {path} lost input(s) {lost} (traced as constants); graph inputs: {found}")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = dict.fromkeys(output_names, 0.0)
    scale = dict.fromkeys(output_names, 0.0)
    for inputs in input_sets:
        expected = _run_torch(module, inputs)
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        got = session.run(output_names, feeds)
        for name, want, have in zip(output_names, expected, got):
            if want.shape != have.shape:
                raise UserError(f"ONNX output {name} of {path} has shape {have.shape}, PyTorch {want.shape}")
            diff = np.abs(want.astype(np.float64) - have.astype(np.float64))
            errors[name] = max(errors[name], float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
            scale[name] = max(scale[name], float(np.abs(want).max(initial=0.0)))
    report = ExportReport(path, errors, tolerance, len(input_sets), time.perf_counter() - started, scale)
    log.info("%s", report)
    failed = [n for n in output_names if not errors[n] <= tolerance * max(1.0, scale[n])]
    if failed:
        detail = ", ".join(f"{n} {errors[n]:.2e} (allowed {tolerance * max(1.0, scale[n]):.2e})" for n in failed)
        raise UserError(f"ONNX parity check failed for {path}: max abs error {detail}")
    return report
