"""Batch jobs on a Dask cluster: a folder of images spread over the workers, each calling the servers.

    from distributed import Client
    with Client("tcp://scheduler:8786") as client:
        report = run_dask_batch(client, expand_inputs(["in/"]), Path("out"), ["gpu1:8001", "gpu2:8001"])

Dask schedules one task per image (no scheduler of ours); a worker segments its image through
a `ServerPool` it keeps open for the job (one per worker process, shared by its threads) and
writes the outputs itself, atomically, so the output folder must be shared by the workers. The
resume rule is the folder job's (`batch.is_done`): images whose outputs are up to date are not
even submitted. A bad image is a failure listed at the end; a server problem fails the job.
CLI: ``cellsam-triton segment IN_DIR --out OUT_DIR --dask tcp://host:8786`` (or ``--dask local:4``).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cellsam_triton.errors import ServerError, UserError

from .batch import BatchReport, Job, is_done, output_paths, requested_formats, write_outputs
from .types import SegmentOptions
from .writers import DEFAULT_FORMATS

_POOLS: dict[tuple, Any] = {}
_POOLS_LOCK = threading.Lock()


def _pool(urls: tuple[str, ...], model: str | None, connection: tuple) -> Any:
    """This worker process's ServerPool for these servers (opened once, shared by its threads)."""
    from .pool import ServerPool

    key = (urls, model, connection)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ServerPool(list(urls), model, **dict(connection))
        return _POOLS[key]


def close_pools() -> int:
    """Close the ServerPools this process opened (run on every worker when a job ends)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()
    return len(pools)


def segment_file(source: str, out_dir: str, urls: tuple[str, ...], model: str | None, connection: tuple,
                 options: SegmentOptions, boxes: np.ndarray | None, overlay: bool,
                 formats: tuple[str, ...] = DEFAULT_FORMATS) -> tuple[str, int, str]:
    """The Dask task: segment one file and write its outputs. Returns (status, cells, worker or error)."""
    from .images import read_image

    worker = _worker_name()
    try:
        image = read_image(Path(source))
        pool = _pool(urls, model, connection)
        result = pool.segment(image, boxes=boxes, options=options)
        write_outputs(output_paths(Path(out_dir), Path(source)), image, result, overlay, formats)
    except ServerError:
        raise  # fails the task (Dask retries it, then the job stops)
    except UserError as exc:
        return "failed", 0, str(exc)
    return "done", result.count, worker


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def run_dask_batch(
    client: Any,
    jobs: Sequence[Job],
    out_dir: Path,
    urls: Sequence[str],
    model: str | None = None,
    options: SegmentOptions | None = None,
    boxes: np.ndarray | None = None,
    overlay: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    retries: int = 1,
    formats: Sequence[str] = DEFAULT_FORMATS,
    **connection: Any,
) -> BatchReport:
    """Segment ``jobs`` on the Dask cluster behind ``client`` (a ``distributed.Client``)."""
    from distributed import as_completed
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport(total=len(jobs))
    started = time.perf_counter()
    formats = tuple(formats)
    todo = [j for j in jobs if overwrite or not (j.resumable and is_done(j.source, output_paths(out_dir, j.source), overlay, formats))]
    report.skipped = len(jobs) - len(todo)
    settings = (tuple(urls), model, tuple(sorted(connection.items())))
    bar = tqdm(total=len(todo), unit="image", file=sys.stderr, disable=None if progress is None else not progress)
    futures = {
        client.submit(segment_file, str(j.source), str(out_dir), *settings, options or SegmentOptions(), boxes, overlay, formats,
                      key=f"cellsam-segment-{k}-{j.source.name}-{time.time_ns()}", retries=retries, pure=False): j
        for k, j in enumerate(todo)
    }
    try:
        for future in as_completed(futures):
            job = futures[future]
            bar.update(1)
            try:
                status, cells, detail = future.result()
            except ServerError:
                raise
            except Exception as exc:  # a worker died more often than `retries`
                raise ServerError(f"Dask task for {job.source} failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
            if status == "failed":
                report.failed.append((job.source, detail))
                bar.write(f"cellsam-triton segment: error: {detail}", file=sys.stderr)
                continue
            report.segmented += 1
            report.cells += cells
            report.by_worker[detail] = report.by_worker.get(detail, 0) + 1
    finally:
        for future in futures:
            future.cancel()
        bar.close()
        try:
            client.run(close_pools)
        except Exception:  # workers gone: their pools went with them
            pass
        report.elapsed_s = time.perf_counter() - started
    return report


@contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A distributed.Client for a scheduler address, or for a new LocalCluster with ``local:N``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("Dask is not installed; install the extra: pip install 'cellsam-triton[dask]'") from None
    if address.startswith("local:"):
        try:
            workers = int(address.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--dask local:N needs a worker count, got {address!r}") from None
        if workers < 1:
            raise UserError(f"--dask local:N needs at least 1 worker, got {workers}")
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="20s")
    except Exception as exc:
        raise ServerError(f"cannot reach the Dask scheduler at {address}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    with client:
        yield client


def run_cli(args: argparse.Namespace, jobs: Sequence[Job], urls: Sequence[str], connection: dict,
            options: SegmentOptions, boxes: np.ndarray | None) -> int:
    """`segment ... --dask ADDRESS`: the folder job on a Dask cluster; summary and failures as usual."""
    with dask_client(args.dask) as client:
        report = run_dask_batch(client, jobs, args.out, urls, args.model, options, boxes, overlay=args.overlay,
                                overwrite=args.overwrite, progress=args.progress,
                                formats=requested_formats(args), **connection)
    print(report.summary() + f" on {len(report.by_worker)} Dask workers")
    if report.failed:
        print(f"failed ({len(report.failed)}): {', '.join(str(s) for s, _ in report.failed)}", file=sys.stderr)
        return 1
    return 0
