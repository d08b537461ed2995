"""Learning-rate schedule and the per-branch optimiser."""

from __future__ import annotations

import pytest
import torch

from distill_depth.config import OptimConfig
from distill_depth.train.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_step_decay() -> None:
    cfg = OptimConfig(warmup_steps=4, schedule="step", milestones=(0.5, 0.75), decay_factor=0.1)
    factors = [lr_factor(s, 100, cfg) for s in (0, 1, 3, 4, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_cosine_and_constant() -> None:
    cosine = OptimConfig(schedule="cosine")
    assert lr_factor(0, 10, cosine) == pytest.approx(1.0)
    assert lr_factor(5, 10, cosine) == pytest.approx(0.5)
    assert lr_factor(10, 10, cosine) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, 10, OptimConfig(schedule="constant")) == 1.0


def test_pose_parameters_get_their_own_lr() -> None:
    model = torch.nn.ModuleDict({"depth_net": torch.nn.Linear(2, 2), "pose_net": torch.nn.Linear(2, 2)})
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, lr_pose=1e-4))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    scheduler = build_scheduler(optimizer, 10, OptimConfig(lr=1e-3, lr_pose=1e-4, warmup_steps=2))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-5])
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-4])
