"""What every trainer here shares (detector, decoder, one-image LoRA): the AdamW optimiser with its
learning-rate schedule, and the file checksums that go into provenance files."""

from __future__ import annotations

import hashlib
import math
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterable

SCHEDULES = ("warmup_cosine", "one_cycle")


def command_line(subcommand: str) -> str:
    """This process's command as ``cellsam-triton SUBCOMMAND ARGS`` (for provenance files)."""
    if subcommand in sys.argv:
        return f"cellsam-triton {subcommand} " + shlex.join(sys.argv[sys.argv.index(subcommand) + 1:])
    return shlex.join(sys.argv)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over the first 5 % (at least one step), then
    cosine decay to 0 at ``steps``."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return factor


def optimiser(params: Iterable, lr: float, steps: int, weight_decay: float = 1e-4, schedule: str = "warmup_cosine"):
    """(AdamW, its scheduler) for ``steps`` optimiser steps. ``params`` may be parameter groups
    (their own ``lr``). ``schedule``: "warmup_cosine" (above) or "one_cycle" (torch's OneCycleLR
    peaking at ``lr`` after 10 % of the steps)."""
    import torch

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "one_cycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
