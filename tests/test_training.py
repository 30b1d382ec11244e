"""export/training.py: the optimiser + schedule every trainer uses, the provenance command line and sha256."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

from cellsam_triton.export.training import command_line, optimiser, sha256_file, warmup_cosine


def test_warmup_cosine_rises_then_decays_to_zero() -> None:
    factor = warmup_cosine(100)  # 5 warm-up steps
    assert [round(factor(s), 3) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert factor(5) == pytest.approx(1.0) and factor(52) == pytest.approx(0.5, abs=0.02)
    assert factor(100) == pytest.approx(0.0, abs=1e-12) and factor(500) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) >= factor(s + 1) for s in range(5, 100))
    assert warmup_cosine(1)(0) == 1.0  # a one-step run still takes its step


@pytest.mark.parametrize("schedule", ["warmup_cosine", "one_cycle"])
def test_optimiser_steps_its_schedule(schedule: str) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    opt, sched = optimiser([weight], 1e-2, 20, schedule=schedule)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-4
    rates = []
    for _ in range(20):
        (weight ** 2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        rates.append(opt.param_groups[0]["lr"])
    assert max(rates) <= 1e-2 + 1e-12 and rates[-1] < 1e-3 and float(weight.detach().sum()) < 3.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        optimiser([weight], 1e-2, 20, schedule="step")


def test_parameter_groups_keep_their_own_rates() -> None:
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt, sched = optimiser([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], 1e-3, 40, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.5, 1e-4 * 0.5])  # warm-up step 0 of 2
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert math.isclose(sched.get_last_lr()[0] / sched.get_last_lr()[1], 10.0)


def test_sha256_and_command_line(tmp_path: Path, monkeypatch) -> None:
    data = b"x" * (3 << 20)  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(sys, "argv", ["/x/bin/cellsam-triton", "train-decoder", "--steps", "3", "--out", "a b.pt"])
    assert command_line("train-decoder") == "cellsam-triton train-decoder --steps 3 --out 'a b.pt'"
    assert command_line("train-detector") == "/x/bin/cellsam-triton train-decoder --steps 3 --out 'a b.pt'"
