"""``run_benchmark``: a benchmark script as a subprocess on CPU, one thread, no W&B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def run_benchmark() -> Callable[..., subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}

    def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)

    return run
