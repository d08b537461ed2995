"""Fixtures of the trainer tests (helpers live in ``train_procs.py``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_procs import (
    FOUR_RANK_OVERRIDES, FOUR_RANK_STEPS, REFERENCE_STEPS, TINY_HW, ReferenceRun, child_env, launch, launch_accelerate,
    tiny_overrides,
)


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


@pytest.fixture(scope="session")
def reference_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """One uninterrupted 2-process run (``accelerate launch`` with launch/accelerate/cpu_2proc.yaml,
    REFERENCE_STEPS steps, exchange and weight dumps), shared by the split test (exchange, weights,
    tracker none) and the resume test (the run a stopped-and-resumed one must equal): one run
    fewer of the slowest kind."""
    base = tmp_path_factory.mktemp("reference")
    out, dump = base / "run", base / "dump"
    run = launch_accelerate("launch/accelerate/cpu_2proc.yaml",
                            tiny_overrides(tiny_shards, out, REFERENCE_STEPS, "train.report_to=none"),
                            out, DISTILL_DEPTH_DUMP_DIR=str(dump))
    codes = run.wait()
    _drop_checkpoints(out, codes)
    return ReferenceRun(run, codes, dump)


@pytest.fixture(scope="session")
def four_rank_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """One 4-process DDP run (2 S + 2 U ranks, started the way srun starts tasks: only SLURM_*
    variables), FOUR_RANK_STEPS steps, exchange and weight dumps; shared by the split test (replicas
    agree, groups stay apart) and the ZeRO-1 test (the losses and weights ZeRO must give)."""
    base = tmp_path_factory.mktemp("four_ranks")
    out, dump = base / "run", base / "dump"
    run = launch(4, tiny_overrides(tiny_shards, out, FOUR_RANK_STEPS, *FOUR_RANK_OVERRIDES), out, slurm=True,
                 DISTILL_DEPTH_DUMP_DIR=str(dump))
    codes = run.wait(timeout=300)
    _drop_checkpoints(out, codes)
    return ReferenceRun(run, codes, dump)


def _drop_checkpoints(out: Path, codes: list[int]) -> None:
    """The session-wide runs are compared by their metrics, dumps and exports, never resumed: their
    checkpoints (~0.5 GB each) would otherwise stay on disk until the session ends. A failed run
    keeps everything for the reader."""
    if all(code == 0 for code in codes):
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
