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
