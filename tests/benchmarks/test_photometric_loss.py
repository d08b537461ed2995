"""Smoke test of benchmarks/photometric_loss.py at tiny settings (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_photometric_loss_benchmark_runs_and_prints_ratio() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "photometric_loss.py"), "--batch-size", "1", "--height", "12",
         "--width", "20", "--scales", "2", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "new/old" in out.stdout and "20x12" in out.stdout
