"""Smoke tests of benchmarks/gpu_check.py on CPU: the no-CUDA exit, and its tiny CPU mode running
the measuring code (no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_says_so_and_exits_0(run_benchmark) -> None:
    out = run_benchmark("gpu_check.py", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs CUDA" in out.stdout


def test_gpu_check_cpu_smoke_prints_the_table_and_keeps_failed_rows(run_benchmark) -> None:
    out = run_benchmark("gpu_check.py", "--cpu-smoke", "--threads", "1", "--variants", "eager,no_such_switch",
                        "--sections", "train,eval")
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:2]): line for line in out.stdout.splitlines() if line.split()[:1] in (["train"], ["eval"])}
    assert "samples/s" in rows[("train", "eager")], out.stdout
    assert "FAILED: ValueError" in rows[("train", "no_such_switch")], out.stdout  # a broken row, the table goes on
    assert "images/s" in rows[("eval", "fp32")] and "images/s" in rows[("eval", "bf16+channels_last")], out.stdout


def test_pip_install_command_uses_only_the_wheels_folder() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    command = gpu_check.pip_install_command("wheels", ["kornia"])
    assert command[1:] == ["-m", "pip", "install", "--no-index", "--find-links", "wheels", "kornia"]
