"""Faults over real processes: a stop signal on one rank, exact resume, a rank that dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_depth.train.checkpoint import complete_checkpoints

from train_procs import REFERENCE_STEPS, ReferenceRun, launch, loss_terms, tiny_overrides, wait_for_log, wait_for_step

pytestmark = pytest.mark.slow

STEPS = REFERENCE_STEPS


def test_signal_on_one_rank_stops_all_and_resume_is_exact(reference_run: ReferenceRun, tiny_shards: Path,
                                                          tmp_path: Path) -> None:
    """SIGTERM to rank 1's process group only (the rank and its DataLoader worker, as SLURM signals a
    task): both ranks stop after the same step, write one complete checkpoint and
    exit 0; the same command then resumes and ends with the losses and weights of a run that was
    never interrupted (``reference_run``: the same 2-rank config, started by accelerate)."""
    whole, whole_out, cut_out = reference_run.run, reference_run.run.out, tmp_path / "cut"
    cut = launch(2, tiny_overrides(tiny_shards, cut_out, STEPS), cut_out)
    wait_for_step(cut, 1)
    os.killpg(cut.procs[1].pid, signal.SIGTERM)
    assert cut.wait() == [0, 0], cut.tail()
    checkpoints = sorted((cut_out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file(), checkpoints
    stopped_at = int(checkpoints[0].name.split("_")[1])
    assert 1 <= stopped_at < STEPS
    for name in ("S/model.safetensors", "U/model.safetensors", "S/optimizer.pt", "U/scheduler.pt",
                 "rng/rank_00000.pt", "rng/rank_00001.pt", "state.json", "config.yaml"):
        assert (checkpoints[0] / name).is_file(), name
    assert not list((cut_out / "checkpoints").glob(".tmp_*"))

    resumed = launch(2, tiny_overrides(tiny_shards, cut_out, STEPS), cut_out)
    assert resumed.wait() == [0, 0], resumed.tail()
    assert f"resuming from checkpoint step {stopped_at}" in resumed.logs[0].read_text()
    assert reference_run.codes == [0], whole.tail()

    reference, after = loss_terms(whole.metrics()), loss_terms(cut.metrics())
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == reference[step], f"step {step}: {after[step]} != {reference[step]}"
    for name in ("S", "U"):
        a = load_file(whole_out / "export" / f"{name}.safetensors")
        b = load_file(cut_out / "export" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_signal_before_the_first_step_exits_cleanly(tiny_shards: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 during start-up (rank 0 has just logged the placement; models, stream and
    tracker are still being built): not fatal; both ranks agree before the first step and exit 0
    without writing a checkpoint (no step was done, nothing new to save)."""
    out = tmp_path / "run"
    run = launch(2, tiny_overrides(tiny_shards, out, STEPS), out)
    wait_for_log(run, "placement:")
    os.killpg(run.procs[1].pid, signal.SIGTERM)
    assert run.wait() == [0, 0], run.tail()
    assert "stopped by signal before the first step (at step 0)" in run.logs[0].read_text()
    assert "received SIGTERM" in run.logs[1].read_text()
    assert not complete_checkpoints(out) and not (out / "export").exists() and run.metrics() == []


def test_dead_rank_makes_the_others_exit_nonzero(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = launch(2, tiny_overrides(tiny_shards, out, 50, "train.timeout_s=30"), out)
    wait_for_step(run, 1)
    run.procs[1].kill()
    start = time.monotonic()
    code = run.procs[0].wait(timeout=90)
    assert code != 0
    assert time.monotonic() - start < 60


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the training processes torchrun started (read from their environment)."""
    workers = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            workers[int(ranks[0])] = int(child)
    return workers


def test_torchrun_restarts_a_killed_rank_and_resumes_to_the_same_weights(reference_run: ReferenceRun,
                                                                          tiny_shards: Path, tmp_path: Path) -> None:
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed after the checkpoint of step 1; the launcher
    stops the group and starts it again, the new ranks resume from the newest complete checkpoint
    and end with the export of the uninterrupted run (``reference_run``: same config, accelerate).

    Without ``distributed.init_restarted_group`` the restarted round reads the dead round's gloo
    addresses from the agent's store and fails ("connectFullMesh ... Connection refused")."""
    import subprocess
    import sys

    from train_procs import REPO, child_env, free_port

    out = tmp_path / "run"
    out.mkdir()
    log = tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--max-restarts", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "distill_depth.cli", "train",
               *tiny_overrides(tiny_shards, out, STEPS, "train.report_to=none", "train.ckpt_every=1")]
    with log.open("w") as handle:
        launcher = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not (out / "checkpoints" / "step_00000001" / "COMPLETE").is_file():
                assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)
            code = launcher.wait(timeout=240)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "resuming from checkpoint step" in text, text[-3000:]
    resumed_at = int(text.split("resuming from checkpoint step ")[1].split()[0])
    assert 1 <= resumed_at < STEPS, resumed_at
    assert reference_run.codes == [0], reference_run.run.tail()
    for name in ("S", "U"):
        a = load_file(reference_run.run.out / "export" / f"{name}.safetensors")
        b = load_file(out / "export" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
