"""Sample-wise vs batched execution of the default model's cpu encoder, one run on one machine.

    python -m bench.sample_wise --repository build/repository [--clients 4 --seconds 20 --rounds 3]

The same export is served twice: as exported (``sample_wise`` "1": each sample of a dynamic batch
runs in its own ONNX Runtime call, so its output does not depend on the batch) and with
``sample_wise`` "0" on its batched models (the whole batch in one call). N concurrent clients send
single tiles straight to ``cellsam_lite_encoder`` (closed loop, bench/load.py) for S seconds, the
two servers taking turns A B A B; each round reports throughput, the mean batch Triton formed and
its statistics per stage. Writes bench/sample_wise.{json,md}.
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


def one_round(url: str, clients: int, seconds: float) -> dict:
    """Load on the encoder and Triton's statistics of what it did meanwhile."""
    import tritonclient.grpc as grpcclient

    from cellsam_triton.contracts import LITE

    from .load import run_load, synthetic_request
    from .measure import statistics_delta, triton_statistics

    name = LITE.encoder_name
    with grpcclient.InferenceServerClient(url) as client:
        before = triton_statistics(client, [name])
        report = run_load(url, name, synthetic_request(LITE), clients, seconds)
        stats = statistics_delta(before, triton_statistics(client, [name]))[name]
    if report.error_count:
        raise UserError(f"encoder load: {report.error_count} errors: {report.first_errors[:1]}")
    mean_batch = stats["requests"] / max(stats["executions"], 1)
    return {"throughput_rps": report.throughput_rps, "p50_ms": report.p50_ms, "mean_batch": mean_batch,
            "executed_infer_ms_per_tile": stats["executed_infer_ms"] / max(stats["requests"], 1),
            "queue_ms": stats["queue_ms"], "compute_infer_ms": stats["compute_infer_ms"], "statistics": stats}


def measure(args: argparse.Namespace) -> dict:
    from cellsam_triton.server import EmbeddedServer

    if not (args.repository / "cellsam_lite_encoder" / "config.pbtxt").is_file():
        raise UserError(f"{args.repository}: no default export there; run `make export` first")
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sample-wise-") as tmp:
        repositories = {"1": args.repository, "0": batched_copy(args.repository, Path(tmp))}
        with EmbeddedServer(repositories["1"]) as served, EmbeddedServer(repositories["0"]) as batched:
            urls = {"1": served.grpc_url, "0": batched.grpc_url}
            for _ in range(args.rounds):
                row = {LABELS[k]: one_round(urls[k], args.clients, args.seconds) for k in ("1", "0")}
                row["ratio"] = row[LABELS["1"]]["throughput_rps"] / row[LABELS["0"]]["throughput_rps"]
                rounds.append(row)
    ratios = sorted(r["ratio"] for r in rounds)
    return {"clients": args.clients, "seconds": args.seconds, "rounds": rounds, "median_ratio": ratios[len(ratios) // 2]}


def render(result: dict) -> str:
    lines = [f"# Encoder throughput, sample-wise vs one call a batch ({result['clients']} clients, "
             f"{result['seconds']:g} s a round, single 256x256 tiles)", "",
             "| round | mode | tiles/s | mean batch | executed infer ms / tile | queue ms | p50 ms |", "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(result["rounds"], 1):
        for label in LABELS.values():
            r = row[label]
            lines.append(f"| {i} | {label} | {r['throughput_rps']:.2f} | {r['mean_batch']:.2f} | "
                         f"{r['executed_infer_ms_per_tile']:.0f} | {r['queue_ms']:.0f} | {r['p50_ms']:.0f} |")
    ratios = ", ".join(f"{row['ratio']:.2f}" for row in result["rounds"])
    lines += ["", f"Throughput sample-wise / one call a batch, round by round: {ratios}; median **{result['median_ratio']:.2f}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/repository"), help="default export (default %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per round and mode (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs (default %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    args = parser.parse_args(argv)
    return run_bench("bench.sample_wise", args.out, "sample_wise", lambda: measure(args), render)


if __name__ == "__main__":
    raise SystemExit(main())
