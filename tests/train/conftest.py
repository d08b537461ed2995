"""Fixtures of the trainer tests (helpers live in ``train_procs.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train_procs import TINY_HW, child_env


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 synthetic samples at 64x128 in 3 real WebDataset shards (made by our own commands)."""
    base = tmp_path_factory.mktemp("tiny_shards")
    env = child_env()
    height, width = TINY_HW
    subprocess.run(
        [sys.executable, "-m", "distill_depth.cli", "synth", "--out", str(base / "raw"), "--drives", "1",
         "--frames", "12", "--height", str(height), "--width", str(width), "--azimuth-steps", "500"],
        check=True, env=env, capture_output=True, timeout=300,
    )
    subprocess.run(
        [sys.executable, "-m", "distill_depth.cli", "make-shards", "--kitti-root", str(base / "raw"),
         "--out", str(base / "train"), "--samples-per-shard", "4", "--no-progress"],
        check=True, env=env, capture_output=True, timeout=300,
    )
    return base / "train"


