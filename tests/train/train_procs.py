"""Helpers of the trainer tests: real training processes started like a launcher starts them.

Processes are started the way a launcher starts them (torchrun-style ``RANK``/``WORLD_SIZE``/
``MASTER_*`` variables, or srun's ``SLURM_*``), without a supervising launcher, so that a test can
signal or kill one rank and watch what the others do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
TINY_HW = (64, 128)
"""Smallest frame the depth decoder takes (its deepest map must be >= 2 pixels high)."""
REFERENCE_STEPS = 4
"""Steps of the shared uninterrupted 2-process run (``reference_run`` in conftest.py)."""
FOUR_RANK_STEPS = 2
FOUR_RANK_OVERRIDES = ("data.batch_size=1", "optim.grad_clip=0.5", "train.grad_accum=2")
"""Steps and extra overrides of the shared 4-process DDP run (``four_rank_run`` in conftest.py):
a clip that binds (the gradient norms are 5-8) and accumulation, which the ZeRO-1 run must match."""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", DISTILL_DEPTH_REQUEUE="0")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"data.train_shards={shards}", f"data.val_shards={shards}", "data.batch_size=2", "data.num_workers=1",
        "data.shuffle_buffer=8", f"train.max_steps={steps}", f"train.output_dir={out}", "train.log_every=1",
        "train.val_every=0", "train.image_every=0", f"train.ckpt_every={steps}", "train.timeout_s=60",
        "optim.warmup_steps=0", *extra,
    ]


def loss_terms(metrics: list[dict]) -> dict[int, dict[str, float]]:
    """Per step, the branch terms of ``metrics.jsonl`` rows (timings and throughput left out: wall-clock)."""
    return {
        m["step"]: {k: v for k, v in m.items() if k[:2] in ("S/", "U/") and not k.endswith("_s")}
        for m in metrics if "S/loss" in m
    }


class RunsCode:
    """A pickled object whose unpickling would create ``marker`` (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Run:
    procs: list[subprocess.Popen]
    logs: list[Path]
    out: Path

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"training did not finish in {timeout} s:\n{self.tail()}") from None
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- rank {i} ---\n{p.read_text()[-chars:]}" for i, p in enumerate(self.logs) if p.exists())

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class ReferenceRun:
    run: Run
    codes: list[int]
    dump: Path


def launch(world: int, overrides: list[str], out: Path, *, slurm: bool = False, **env: str) -> Run:
    """``world`` training processes of ``python -m distill_depth.cli train`` with launcher variables."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        if slurm:
            launch_env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
                          "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port}
        else:
            launch_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                          "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = out.parent / f"{out.name}.rank{rank}.log"
        handle = log.open("w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distill_depth.cli", "train", *overrides], cwd=REPO,
            env=child_env(**launch_env, **env), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group per rank (the rank + its DataLoader workers), as under srun
        ))
        logs.append(log)
    return Run(procs, logs, out)


def launch_accelerate(config_file: str, overrides: list[str], out: Path, **env: str) -> Run:
    """``accelerate launch --config_file CONFIG train.py ...`` on CPU (one launcher process)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.launcher.log"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
               "--main_process_port", str(free_port()), "train.py", *overrides]
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(ACCELERATE_USE_CPU="1", **env),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    return Run([proc], [log], out)


def _wait_until(run: Run, done, what: str, timeout: float, poll: float) -> None:
    """Block until ``done()``; fail (killing the run) if a rank exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if any(p.poll() is not None for p in run.procs):
            raise AssertionError(f"a rank exited before {what}:\n{run.tail()}")
        time.sleep(poll)
    run.kill()
    raise AssertionError(f"{what}: not within {timeout} s:\n{run.tail()}")


def wait_for_step(run: Run, step: int, timeout: float = 180) -> None:
    """Block until rank 0 has logged ``step`` (metrics.jsonl)."""
    _wait_until(run, lambda: any(m["step"] >= step for m in run.metrics()), f"step {step}", timeout, 0.2)


def wait_for_log(run: Run, text: str, rank: int = 0, timeout: float = 180) -> None:
    """Block until rank ``rank``'s log contains ``text``."""
    log = run.logs[rank]
    _wait_until(run, lambda: log.exists() and text in log.read_text(), f"logging {text!r}", timeout, 0.05)
