"""`make bench-default`: speed and accuracy of the default model, ROI vs full decoding, one run.

On the DSB2018 validation split, in one process and one after the other (each served variant on
its own embedded tritonserver, the others stopped; every method warmed up alike on the first
image before its timed pass):

1. served, ``--decoder-context roi`` (the default export),
2. served, ``--decoder-context full`` (SAM's decoder on the whole embedding for every box), same
   encoder; optionally (``--roi-fp32``) the roi export with the FP32 encoder instead of INT8,
3. raw ONNX Runtime: the very same pipeline steps (``model_repository/box_pipeline.py``) and
   client rules on plain ONNX Runtime sessions of the same ONNX files, same threads, no Triton,
   for both contexts,
4. the classical baseline (Otsu + watershed, bench/baseline.py).

For each: seconds per image (client wall time of one whole ``segment`` call, auto-scale included),
per-image F1@0.5, and per stage the seconds per image and per call (Triton's statistics API for
the served rows, session timings for the raw rows). Ratios: roi vs full per image, served vs raw
(the cost of serving), the served encoder's compute time per call vs raw ONNX Runtime's, and the
share of the pipeline's time spent outside its composing models (the BLS overhead). Writes
``speed_default.json`` (with the git commit and the machine) and ``speed_default.md``.

    python -m bench.speed_default --roi build/bench-default/roi --full build/bench-default/full [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from cellsam_triton.errors import UserError

from .report import machine, run_bench

HERE = Path(__file__).resolve().parent
STAGES = ("encoder", "detector", "decoder", "roi_decoder")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", type=Path, required=True, help="repository exported with --decoder-context roi")
    parser.add_argument("--full", type=Path, required=True, help="repository exported with --decoder-context full")
    parser.add_argument("--roi-fp32", type=Path, default=None, metavar="REPO",
                        help="also serve this repository (exported with --encoder-precision fp32): the INT8 encoder's cost in F1")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="DSB-layout folder")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N validation images only")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    parser.add_argument("--threads", type=int, default=0, help="raw ONNX Runtime intra-op threads (0: all cores, as served)")
    parser.add_argument("--skip", default="", help="comma-separated methods not to run (roi,full,raw_roi,raw_full,classical)")
    return parser.parse_args(argv)


# --- one method over the images -------------------------------------------------------------
def timed_pass(data: Path, records: list, predict: Callable[[np.ndarray], np.ndarray], desc: str) -> list[dict]:
    """One warm-up call on the first image, then every image timed and scored."""
    from tqdm import tqdm

    from cellsam_triton.client.metrics import IOU_THRESHOLD, score_image
    from cellsam_triton.datasets import load_sample

    predict(load_sample(data, records[0].id)[0])
    rows = []
    for record in tqdm(records, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True):
        image, labels = load_sample(data, record.id)
        started = time.perf_counter()
        predicted = predict(image)
        seconds = time.perf_counter() - started
        score = score_image(labels, predicted, IOU_THRESHOLD, id=record.id, kind=record.kind, seconds=seconds)
        rows.append({"id": record.id, "kind": record.kind, "seconds": seconds, "f1": score.f1,
                     "tp": score.tp, "fp": score.fp, "fn": score.fn})
    return rows


def method_summary(rows: list[dict], stages: dict) -> dict:
    seconds = np.array([r["seconds"] for r in rows])
    return {"images": len(rows), "seconds_per_image": float(seconds.mean()), "seconds_median": float(np.median(seconds)),
            "seconds_total": float(seconds.sum()), "f1_mean": float(np.mean([r["f1"] for r in rows])),
            "stages": stages, "per_image": rows}


# --- served ------------------------------------------------------------------------------------
def served(repository: Path, data: Path, records: list, desc: str) -> dict:
    """The default model through an embedded tritonserver on ``repository``; Triton's own stage figures."""
    import tritonclient.grpc as grpcclient

    from .measure import statistics_delta, triton_statistics
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.server import EmbeddedServer

    if not (repository / "cellsam_lite" / "config.pbtxt").is_file():
        raise UserError(f"no exported default model in {repository}; run `make bench-default` (it exports it)")
    with EmbeddedServer(repository) as server, Segmenter(server.grpc_url, timeout_s=600) as segmenter:
        family = segmenter.family
        models = [family.pipeline_name] + [m for m in (family.encoder_name, family.detector_name, family.decoder_name,
                                                       family.roi_decoder_name) if m in server.models]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        segmenter.segment(_first_image(data, records))  # warm-up outside the statistics
        before = triton_statistics(client, models)
        rows = timed_pass(data, records, lambda image: segmenter.segment(image).labels, desc)
        delta = statistics_delta(before, triton_statistics(client, models))
        client.close()
    n = len(rows)
    pipeline = delta.pop(family.pipeline_name)
    stages = {}
    for model, d in delta.items():  # compute each model really did (a dynamic batch counted once)
        stages[model[len(family.name) + 1:]] = {
            "calls": d["requests"], "executions": d["executions"], "seconds_per_image": d["executed_infer_ms"] / 1e3 / n,
            "compute_ms_per_call": d["executed_infer_ms"] / max(1, d["requests"]), "queue_ms_per_call": d["queue_ms"]}
    composing_ms = sum(d["total_ms"] for d in delta.values())  # as the pipeline waits for them: queue included
    pipeline_ms = pipeline["executed_infer_ms"]
    stages["pipeline"] = {"calls": pipeline["requests"], "seconds_per_image": pipeline_ms / 1e3 / n,
                          "compute_ms_per_call": pipeline_ms / max(1, pipeline["requests"]),
                          "bls_overhead": (pipeline_ms - composing_ms) / pipeline_ms if pipeline_ms else 0.0}
    return {**method_summary(rows, stages), "family": family.to_json()}


def _first_image(data: Path, records: list) -> np.ndarray:
    from cellsam_triton.datasets import load_sample

    return load_sample(data, records[0].id)[0]


# --- raw ONNX Runtime --------------------------------------------------------------------------
class OrtModels:
    """A ``call`` for box_pipeline.BoxPipeline on plain ONNX Runtime sessions (the cpu runners' thread
    settings); seconds per stage."""

    def __init__(self, repository: Path, names: list[str], threads: int) -> None:
        import onnxruntime as ort

        from cellsam_triton.export.repository import CPU_SPINNING

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", CPU_SPINNING)  # as the cpu runners
        self.sessions = {n: ort.InferenceSession(str(repository / n / "1" / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"]) for n in names}
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, stage: str, model: str, inputs: dict, outputs: tuple) -> list[np.ndarray]:
        started = time.perf_counter()
        result = self.sessions[model].run(list(outputs), inputs)
        self.seconds[model] += time.perf_counter() - started
        self.calls[model] += 1
        return result

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def raw(repository: Path, family_json: str, data: Path, records: list, threads: int, desc: str) -> dict:
    """The same pipeline steps and client rules, the models on plain ONNX Runtime sessions."""
    from cellsam_triton.client.lite_rules import segment
    from cellsam_triton.client.transport import to_result
    from cellsam_triton.client.types import SegmentOptions
    from cellsam_triton.contracts import Family
    from cellsam_triton.model_repository.box_pipeline import BoxPipeline

    family = Family.from_json(family_json)
    names = [n for n in (family.encoder_name, family.detector_name, family.decoder_name, family.roi_decoder_name)
             if (repository / n / "1" / "model.onnx").is_file()]
    models = OrtModels(repository, names, threads)
    pipeline = BoxPipeline(family, models)

    def run(requests: list[dict]) -> list:
        return [to_result(pipeline.segment(r)) for r in requests]

    def predict(image: np.ndarray) -> np.ndarray:
        return segment(image, run, family, None, SegmentOptions()).labels

    predict(_first_image(data, records))
    models.reset()
    rows = timed_pass(data, records, predict, desc)
    n = len(rows)
    stages = {m[len(family.name) + 1:]: {"calls": models.calls[m], "seconds_per_image": models.seconds[m] / n,
                                         "compute_ms_per_call": 1e3 * models.seconds[m] / max(1, models.calls[m])}
              for m in names if models.calls[m]}
    return method_summary(rows, stages)


def classical(data: Path, records: list) -> dict:
    from .baseline import segment_classical

    return method_summary(timed_pass(data, records, segment_classical, "classical"), {})


# --- report ------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(methods: dict) -> dict:
    """The figures the issue asks for, from the measured methods (None where a method was skipped)."""
    s = {k: v["seconds_per_image"] for k, v in methods.items()}
    out: dict[str, float | None] = {}
    if "roi" in s and "full" in s:
        out["full_over_roi_per_image"] = ratio(s["full"], s["roi"])
        out["f1_roi_minus_full"] = methods["roi"]["f1_mean"] - methods["full"]["f1_mean"]
    for context in ("roi", "full"):
        if context in s and f"raw_{context}" in s:
            out[f"served_over_raw_{context}"] = ratio(s[context], s[f"raw_{context}"])
            served_enc = methods[context]["stages"].get("encoder", {}).get("compute_ms_per_call")
            raw_enc = methods[f"raw_{context}"]["stages"].get("encoder", {}).get("compute_ms_per_call")
            if served_enc and raw_enc:
                out[f"encoder_served_over_raw_{context}"] = ratio(served_enc, raw_enc)
        if context in methods:
            out[f"bls_overhead_{context}"] = methods[context]["stages"]["pipeline"]["bls_overhead"]
    if "roi_fp32" in s and "roi" in s:
        out["fp32_over_int8_encoder_per_image"] = ratio(s["roi_fp32"], s["roi"])
        out["f1_int8_minus_fp32_encoder"] = methods["roi"]["f1_mean"] - methods["roi_fp32"]["f1_mean"]
    if "classical" in s and "roi" in s:
        out["roi_over_classical_per_image"] = ratio(s["roi"], s["classical"])
    return out


TITLES = {"roi": "served, decoder context roi (default)", "full": "served, decoder context full",
          "roi_fp32": "served, roi, FP32 encoder",
          "raw_roi": "raw ONNX Runtime, roi", "raw_full": "raw ONNX Runtime, full", "classical": "classical (Otsu + watershed)"}


def markdown(result: dict) -> str:
    lines = [f"# Default model speed, DSB2018 val split ({result['images']} images)", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores; commit {result['machine']['git_commit'][:10]}; "
             f"{result['machine']['date']}", "",
             "| method | s/image (mean) | s/image (median) | F1@0.5 per image | encoder s/img | detector s/img | decoder s/img | ROI decoder s/img | encoder ms/call |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, m in result["methods"].items():
        st = m["stages"]
        cell = lambda stage: f"{st[stage]['seconds_per_image']:.3f}" if stage in st else "-"  # noqa: E731
        enc = f"{st['encoder']['compute_ms_per_call']:.0f}" if "encoder" in st else "-"
        lines.append(f"| {TITLES[key]} | {m['seconds_per_image']:.3f} | {m['seconds_median']:.3f} | {m['f1_mean']:.3f} | "
                     f"{cell('encoder')} | {cell('detector')} | {cell('decoder')} | {cell('roi_decoder')} | {enc} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.3f}'} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict:
    from cellsam_triton.client.evaluate import select

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(TITLES)
    if unknown:
        raise UserError(f"--skip: unknown methods {sorted(unknown)}; choose from {', '.join(TITLES)}")
    records = select(args.data, "val", args.limit)
    methods: dict[str, dict] = {}
    families: dict[str, str] = {}
    served_rows = [("roi", args.roi), ("full", args.full)] + ([("roi_fp32", args.roi_fp32)] if args.roi_fp32 else [])
    for context, repository in served_rows:
        if context not in skip:
            methods[context] = served(repository, args.data, records, f"served {context}")
            families[context] = methods[context].pop("family")
    for context, repository in (("roi", args.roi), ("full", args.full)):
        if f"raw_{context}" not in skip:
            family_json = families.get(context) or _family_json(repository)
            methods[f"raw_{context}"] = raw(repository, family_json, args.data, records, args.threads, f"raw {context}")
    if "classical" not in skip:
        methods["classical"] = classical(args.data, records)
    return {"split": "val", "images": len(records), "machine": machine(), "methods": methods, "ratios": ratios(methods)}


def _family_json(repository: Path) -> str:
    from cellsam_triton.export.repository import parse_config

    return parse_config(repository / "cellsam_lite" / "config.pbtxt").parameters["family"].string_value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench-default", args.out, "speed_default", lambda: measure(args), markdown)


if __name__ == "__main__":
    sys.exit(main())
