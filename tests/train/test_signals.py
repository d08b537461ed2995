"""Stop requests, SLURM requeue switch, watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distill_depth.train.signals import StopRequest, Watchdog, requeue_if_slurm


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_only_sets_the_flag(signum: int) -> None:
    request = StopRequest().install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert request.requested and request.signum == signum
    finally:
        request.uninstall()
    assert signal.getsignal(signum) is not request._handle


def test_requeue_only_under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_if_slurm() is False
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("DISTILL_DEPTH_REQUEUE", "0")
    assert requeue_if_slurm() is False


def test_watchdog_ends_a_stuck_process() -> None:
    code = "from distill_depth.train.signals import Watchdog; import time; Watchdog(1.0).start(); time.sleep(60)"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == Watchdog.EXIT_CODE
    assert time.monotonic() - start < 30


def test_watchdog_quiet_while_beating() -> None:
    dog = Watchdog(0.4).start()
    for _ in range(8):
        time.sleep(0.1)
        dog.beat()
    dog.stop()
