"""Tracker selection and the stable run id (the W&B run itself is tested in test_loop.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_depth.train.tracking import Tracker, TrackerError, build_tracker, colorize, stable_run_id


def test_run_id_is_stable_per_folder(tmp_path: Path) -> None:
    a, b = tmp_path / "runs" / "exp 1", tmp_path / "other" / "exp 1"
    assert stable_run_id(a) == stable_run_id(a) == stable_run_id(str(a) + "/")
    assert stable_run_id(a) != stable_run_id(b)
    assert stable_run_id(a).startswith("exp-1-")
    assert stable_run_id(a, "my run").startswith("my-run-")


def test_none_and_non_main_ranks_get_a_silent_tracker(tmp_path: Path) -> None:
    assert type(build_tracker("none", tmp_path, {}, "p", None, True)) is Tracker
    assert type(build_tracker("wandb", tmp_path, {}, "p", None, False)) is Tracker
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(TrackerError, match="pip install tensorboard"):
        build_tracker("tensorboard", tmp_path, {}, "p", None, True)


def test_colorize_gives_rgb_pictures() -> None:
    depth = torch.linspace(1, 50, 2 * 8 * 12).view(2, 1, 8, 12)
    confidence = torch.rand(2, 1, 8, 12)
    pictures = colorize(depth, confidence)
    assert [p.shape for p in pictures] == [(8, 12, 3), (8, 12, 3)] and all(p.dtype == np.uint8 for p in pictures)
