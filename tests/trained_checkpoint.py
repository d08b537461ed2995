"""A briefly trained run folder, made once per test session and shared by the evaluate and predict tests.

Real training through the real command (``distill-depth train``, one process, 2 steps) on the
bundled shards; the run folder lives under pytest's session temp folder, so a second test
module reuses it instead of training again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_STEPS = 2


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def trained_run(tmp_path_factory: pytest.TempPathFactory, bundled_shards: Path) -> Path:
    """Run folder of a 2-step training of both branches (export + one complete checkpoint)."""
    run_dir = tmp_path_factory.getbasetemp() / "evaluation_checkpoint" / "run"
    if (run_dir / "export" / "config.yaml").is_file():
        return run_dir
    command = [
        sys.executable, "-m", "distill_depth.cli", "train",
        f"data.train_shards={bundled_shards / 'train'}", "data.val_shards=null",
        "data.batch_size=2", "data.num_workers=0", f"train.max_steps={TRAIN_STEPS}",
        f"train.output_dir={run_dir}", "train.val_every=0", "train.image_every=0", "train.report_to=none",
    ]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"training the test checkpoint failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return run_dir
