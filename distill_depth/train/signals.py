"""Graceful stop on SIGTERM/SIGUSR2, SLURM requeue, and a watchdog against silent hangs.

A signal only sets a flag; the loop turns the flag into a decision that every rank shares (an
all-reduce at each step boundary), so all ranks stop after the same step and write one
consistent checkpoint. Only rank 0 asks SLURM to requeue the job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """Records that a stop signal arrived; ``requested`` is this rank's local view."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signum = signum


def shield_data_workers() -> None:
    """Make DataLoader workers ignore SIGTERM/SIGUSR2 sent by others than their parent.

    SLURM signals every process of a job step, DataLoader workers included, and PyTorch's worker
    SIGTERM handler kills a worker on a signal from anyone but its parent; the dead worker then
    aborts the rank mid-step, before it can checkpoint. Workers are ended by their parent
    through the DataLoader's own shutdown (or when the parent dies), so ignoring these two
    signals in them loses nothing. Applies to workers forked after this call.
    """
    from torch.utils.data._utils import signal_handling  # noqa: PLC0415

    original = signal_handling._set_worker_signal_handlers
    if getattr(original, "_distill_depth_shield", False):
        return

    def set_worker_signal_handlers(*args: object) -> None:
        original(*args)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    set_worker_signal_handlers._distill_depth_shield = True  # type: ignore[attr-defined]
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers


def requeue_if_slurm() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when under SLURM (unless DISTILL_DEPTH_REQUEUE=0)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("DISTILL_DEPTH_REQUEUE", "1") == "0":
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("scontrol requeue %s failed: %s", job_id, exc)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True


class Watchdog:
    """Kills this process (exit 3) when no heartbeat came for ``timeout_s``.

    gloo/NCCL timeouts cover a collective that waits on a dead rank; this covers everything
    else that could block forever (a stuck DataLoader worker, a hung file system write).
    """

    EXIT_CODE = 3

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distill-depth-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                log.error("watchdog: no progress for %.0f s (train.timeout_s=%s); exiting", idle, self.timeout_s)
                logging.shutdown()
                os._exit(self.EXIT_CODE)
