"""Sample-wise vs batched execution of a cpu export's batched model (its encoder), one run on one machine.

    python -m bench.sample_wise --repository build/repository [--model NAME --clients 4 --seconds 20 --rounds 3]

The same export is served twice: as exported (``sample_wise`` "1": each sample of a dynamic batch
runs in its own ONNX Runtime call, so its output does not depend on the batch) and with
``sample_wise`` "0" on its batched models (the whole batch in one call). N concurrent clients send
one-sample requests (random inputs of the model's config shapes) straight to the model (default:
the repository's encoder; closed loop, bench/load.py) for S seconds, the two servers taking turns
A B A B; each round reports throughput, the mean batch Triton formed and its statistics per stage.
Writes <out>/sample_wise.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from cellsam_triton.errors import UserError

from .report import HERE, run_bench

LABELS = {"1": "sample-wise (served)", "0": "one call a batch"}


def batched_copy(repository: Path, into: Path) -> Path:
    """A copy of ``repository`` whose cpu runners run each dynamic batch in one call."""
    from google.protobuf import text_format

    from cellsam_triton.export.repository import parse_config

    copy = Path(shutil.copytree(repository, into / "batched", symlinks=True))
    changed = 0
    for path in copy.glob("*/config.pbtxt"):
        config = parse_config(path)
        if "sample_wise" in config.parameters:
            config.parameters["sample_wise"].string_value = "0"
            path.write_text(text_format.MessageToString(config))
            changed += 1
    if not changed:
        raise UserError(f"{repository}: no model with a sample_wise parameter (export it again)")
    return copy


def encoder_name(repository: Path) -> str:
    """The one model of ``repository`` named ``*_encoder``."""
    names = sorted(p.parent.name for p in repository.glob("*_encoder/config.pbtxt"))
    if len(names) != 1:
        raise UserError(f"{repository}: expected one *_encoder model, found {names or 'none'}; name one with --model")
    return names[0]


def one_sample_request(repository: Path, model: str) -> dict:
    """Random FP32 inputs of one sample, shaped as ``model``'s config says."""
    import numpy as np

    from cellsam_triton.export.repository import parse_config

    config = parse_config(repository / model / "config.pbtxt")
    if config.max_batch_size < 1 or "sample_wise" not in config.parameters:
        raise UserError(f"{model}: not a batched cpu runner (no sample_wise parameter)")
    rng = np.random.default_rng(0)
    return {t.name: rng.random((1, *t.dims), dtype=np.float32) for t in config.input}


def one_round(url: str, model: str, request: dict, clients: int, seconds: float, timeout_s: float) -> dict:
    """Load on ``model`` and Triton's statistics of what it did meanwhile."""
    import tritonclient.grpc as grpcclient

    from .load import run_load
    from .measure import statistics_delta, triton_statistics

    with grpcclient.InferenceServerClient(url) as client:
        before = triton_statistics(client, [model])
        report = run_load(url, model, request, clients, seconds, timeout_s)
        stats = statistics_delta(before, triton_statistics(client, [model]))[model]
    if report.error_count:
        raise UserError(f"{model} load: {report.error_count} errors: {report.first_errors[:1]}")
    mean_batch = stats["requests"] / max(stats["executions"], 1)
    return {"throughput_rps": report.throughput_rps, "p50_ms": report.p50_ms, "mean_batch": mean_batch,
            "executed_infer_ms_per_sample": stats["executed_infer_ms"] / max(stats["requests"], 1),
            "queue_ms": stats["queue_ms"], "compute_infer_ms": stats["compute_infer_ms"], "statistics": stats}


def measure(args: argparse.Namespace) -> dict:
    from cellsam_triton.server import EmbeddedServer

    if not args.repository.is_dir():
        raise UserError(f"{args.repository}: no model repository there; run `make export` first")
    model = args.model or encoder_name(args.repository)
    request = one_sample_request(args.repository, model)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sample-wise-") as tmp:
        repositories = {"1": args.repository, "0": batched_copy(args.repository, Path(tmp))}
        with EmbeddedServer(repositories["1"]) as served, EmbeddedServer(repositories["0"]) as batched:
            urls = {"1": served.grpc_url, "0": batched.grpc_url}
            for _ in range(args.rounds):
                row = {LABELS[k]: one_round(urls[k], model, request, args.clients, args.seconds, args.timeout) for k in ("1", "0")}
                row["ratio"] = row[LABELS["1"]]["throughput_rps"] / row[LABELS["0"]]["throughput_rps"]
                rounds.append(row)
    ratios = sorted(r["ratio"] for r in rounds)
    shapes = {name: list(array.shape) for name, array in request.items()}
    return {"model": model, "inputs": shapes, "clients": args.clients, "seconds": args.seconds, "rounds": rounds,
            "median_ratio": ratios[len(ratios) // 2]}


def render(result: dict) -> str:
    inputs = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result["inputs"].items())
    lines = [f"# {result['model']} throughput, sample-wise vs one call a batch ({result['clients']} clients, "
             f"{result['seconds']:g} s a round, one sample a request: {inputs})", "",
             "| round | mode | samples/s | mean batch | executed infer ms / sample | queue ms | p50 ms |", "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(result["rounds"], 1):
        for label in LABELS.values():
            r = row[label]
            lines.append(f"| {i} | {label} | {r['throughput_rps']:.2f} | {r['mean_batch']:.2f} | "
                         f"{r['executed_infer_ms_per_sample']:.0f} | {r['queue_ms']:.0f} | {r['p50_ms']:.0f} |")
    ratios = ", ".join(f"{row['ratio']:.2f}" for row in result["rounds"])
    lines += ["", f"Throughput sample-wise / one call a batch, round by round: {ratios}; median **{result['median_ratio']:.2f}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/repository"), help="default export (default %(default)s)")
    parser.add_argument("--model", default=None, help="batched model to load (default: the repository's *_encoder)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per round and mode (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs (default %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    args = parser.parse_args(argv)
    return run_bench("bench.sample_wise", args.out, "sample_wise", lambda: measure(args), render)


if __name__ == "__main__":
    raise SystemExit(main())
