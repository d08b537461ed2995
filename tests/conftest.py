"""Shared fixtures: where the real KITTI sample data and the bundled shards live."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED_SHARDS = REPO / "shards"


def sample_data_root() -> Path:
    """``$DISTILL_DEPTH_SAMPLE_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("DISTILL_DEPTH_SAMPLE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    root = sample_data_root()
    if not (root / "udacity_sfnd").is_dir():
        pytest.skip(
            f"real KITTI sample data not found at {root} "
            "(set DISTILL_DEPTH_SAMPLE_DATA or place ../shared/data beside the repo)"
        )
    return root


@pytest.fixture(scope="session")
def kitti_raw_root(sample_data: Path) -> Path:
    """Root of the real raw drive (``2011_09_26/2011_09_26_drive_unknown_sync``)."""
    return sample_data / "udacity_sfnd"


@pytest.fixture(scope="session")
def bundled_shards() -> Path:
    if not (BUNDLED_SHARDS / "train" / "manifest.json").is_file():
        pytest.skip("bundled shards/ not generated yet")
    return BUNDLED_SHARDS


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process network loops on one thread: avoids oversubscription on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for one test module's shared fixtures, removed when the module is done unless one
    of its tests failed. ``tmp_path_factory.mktemp`` keeps its folders until the session ends: a
    training run's checkpoints are ~0.5 GB, and together they filled a CI disk (23 tests failed on
    "No space left on device" at the end of the suite)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
