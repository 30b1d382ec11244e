"""`make demo`: start the embedded server on the exported default model, segment one real image.

Uses a DSB2018 image from ../shared when present, else a synthetic nuclei image made here; writes
the label TIFF, cells CSV and an overlay PNG, stops the server and prints where the files are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import UserError



def synthetic_nuclei(size: int = 512, count: int = 40, seed: int = 0) -> np.ndarray:
    """A fluorescence-like image of bright elliptic nuclei on a dark, noisy background (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size), np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(20, size - 20, 2)
        ry, rx = rng.uniform(7, 14, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        image[inside] = np.maximum(image[inside], rng.uniform(0.5, 1.0))
    image += rng.normal(0.05, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def sample_image(data: Path, out: Path) -> Path:
    """Write the demo input as a TIFF and return its path."""
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    if (data / "manifest.csv").is_file():
        from .datasets import load_manifest, load_sample, split_of

        # the first validation image (manifest order) with a crowd of nuclei worth looking at
        records = [r for r in load_manifest(data) if split_of(r.id) == "val"]
        record = next((r for r in records if r.objects >= 40), records[0])
        image, _ = load_sample(data, record.id)
        path = out / f"dsb_{record.id[:12]}.tif"
        print(f"sample: DSB2018 validation image {record.id} ({record.kind}, {image.shape[1]}x{image.shape[0]})")
    else:
        image = synthetic_nuclei()
        path = out / "synthetic_nuclei.tif"
        print(f"sample: {data} not found, using a synthetic nuclei image")
    tifffile.imwrite(path, image)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/repository"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"))
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)

    from .cli import main as cli_main
    from .server import EmbeddedServer

    try:
        source = sample_image(args.data, args.out)
        with EmbeddedServer(args.repository) as server:
            print(f"server ready at {server.grpc_url}")
            code = cli_main(["segment", str(source), "--out", str(args.out), "--url", server.grpc_url, "--overlay"])
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if code == 0:
        print(f"server stopped. outputs in {args.out.resolve()}:")
        for path in sorted(args.out.iterdir()):
            print(f"  {path.name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
