"""Non-finite steps over real training runs: a NaN injected into a loss term
(``DISTILL_DEPTH_FAULT_NONFINITE``, the fault-injection hook) makes the branch skip its update,
the count is logged, and too many in a row end the run with a checkpoint of the last good state."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_depth.config import ConfigError
from distill_depth.train.checkpoint import checkpoint_dir, complete_checkpoints, verify_checkpoint
from distill_depth.train.nonfinite import FAULT_ENV, BadSteps, InjectedFault, failure_message, first_nonfinite
from distill_depth.train.step import StepOutcome

from train_procs import REPO, child_env, launch, tiny_overrides


def test_fault_syntax_and_verdicts() -> None:
    assert InjectedFault.from_env({FAULT_ENV: "S/sup_nll@3"}) == InjectedFault("S", "sup_nll", 3, 3, None)
    assert InjectedFault.from_env({FAULT_ENV: "U/loss@2-:r1"}) == InjectedFault("U", "loss", 2, None, 1)
    assert InjectedFault.from_env({FAULT_ENV: "S/pf@2-4"}).applies("S", 4, 0)
    assert InjectedFault.from_env({}) is None
    with pytest.raises(ConfigError, match=FAULT_ENV):
        InjectedFault.from_env({FAULT_ENV: "S-sup@x"})
    assert first_nonfinite({"loss": math.nan, "sup_nll": 1.0, "pf": math.inf}) == "pf"  # a term before the total
    assert first_nonfinite({"loss": math.nan, "sup_nll": 1.0}) == "loss"
    assert first_nonfinite({"loss": 1.0}) is None
    bad = BadSteps(["S"], limit=2)
    bad.see("S", {"loss": math.nan, "sup_nll": math.nan})
    bad.settle("S", True, 5)
    bad.settle("S", True, 6)  # this rank saw nothing at step 6 (another rank did): the streak keeps step 5's term
    assert bad.exhausted() and bad.failures(0) == [{"branch": "S", "count": 2, "since": 5, "term": "sup_nll", "rank": 0}]
    others = [{"branch": "S", "count": 2, "since": 5, "term": "gradient", "rank": 0}, {**bad.failures(0)[0], "rank": 1}]
    assert "first non-finite: S/sup_nll (rank 1)" in failure_message(others, 2, "ckpt")
    bad.settle("S", False, 7)
    assert not bad.exhausted() and bad.window == {"S": 2}


def _train(out: Path, shards: Path, fault: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(shards, out, steps, "train.ckpt_every=1", "train.keep_last=20", "train.report_to=none",
                               *extra)
    return subprocess.run([sys.executable, "-m", "distill_depth.cli", "train", *overrides], cwd=REPO,
                          env=child_env(**{FAULT_ENV: fault}), capture_output=True, text=True, timeout=600)


def _weights(out: Path, step: int, branch: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(out, step) / branch / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "S/lr" in m}


def test_nonfinite_steps_are_skipped_and_counted(tiny_shards: Path, tmp_path: Path) -> None:
    """S's sup_nll is NaN at steps 2 and 3 (loss and gradients with it): S skips those two updates
    (its weights and Adam step count after step 3 are those after step 1), U trains on; the run
    finishes with finite weights; S/skipped_steps is 1 in the rows of steps 2 and 3."""
    out = tmp_path / "run"
    result = _train(out, tiny_shards, "S/sup_nll@2-3", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: S/sup_nll is not finite; branch S's optimiser step skipped (1 in a row)" in result.stderr
    rows = _metrics(out)
    assert [rows[s]["S/skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 0, 0]
    assert [rows[s]["U/skipped_steps"] for s in range(1, 6)] == [0] * 5
    assert "S/loss" not in rows[2] and all(math.isfinite(rows[s]["S/loss"]) for s in (1, 4, 5))
    assert _same(_weights(out, 1, "S"), _weights(out, 3, "S")) and not _same(_weights(out, 3, "S"), _weights(out, 4, "S"))
    assert not _same(_weights(out, 1, "U"), _weights(out, 3, "U"))
    adam = [torch.load(checkpoint_dir(out, s) / "S" / "optimizer.pt", weights_only=True)["state"][0]["step"] for s in (1, 3, 4)]
    assert [int(a) for a in adam] == [1, 1, 2]
    exported = load_file(out / "export" / "S.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_too_many_nonfinite_steps_stop_with_the_last_good_state(tiny_shards: Path, tmp_path: Path) -> None:
    """S's sup_nll NaN from step 2 on, train.max_bad_steps=2: after step 3 the run writes a
    checkpoint (S's weights: those after step 1) and exits 1 with one line naming the branch and
    the term."""
    out = tmp_path / "run"
    result = _train(out, tiny_shards, "S/sup_nll@2-", 10, "train.max_bad_steps=2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill-depth train:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "branch S: 2 non-finite steps in a row since step 2" in errors[0] and "S/sup_nll" in errors[0]
    newest = complete_checkpoints(out)[-1]
    assert newest.name == "step_00000003" and str(newest) in errors[0] and verify_checkpoint(newest)
    assert _same(_weights(out, 1, "S"), _weights(out, 3, "S"))
    assert not (out / "export").exists()


@pytest.mark.slow
def test_nonfinite_on_one_rank_is_agreed_by_the_branch(tiny_shards: Path, tmp_path: Path) -> None:
    """2 processes (gloo), colocated (each rank runs both branches; DDP over both ranks): the
    NaN on rank 1 only. Both ranks skip S's updates together and stop after 2 bad steps; rank 0
    prints the one line, naming rank 1's term; rank 1 prints nothing."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, 10, "train.ckpt_every=1", "train.keep_last=20",
                               "train.report_to=none", "topology.mode=colocated", "train.max_bad_steps=2")
    run = launch(2, overrides, out, **{FAULT_ENV: "S/sup_nll@2-:r1"})
    assert run.wait() == [1, 1], run.tail()
    logs = [log.read_text() for log in run.logs]
    assert "Traceback" not in logs[0] + logs[1]
    assert "first non-finite: S/sup_nll (rank 1)" in logs[0] and "distill-depth train:" not in logs[1]
    assert complete_checkpoints(out)[-1].name == "step_00000003"
    assert _same(_weights(out, 1, "S"), _weights(out, 3, "S"))


def _agree_worker(rank: int, world: int, store: str, queue) -> None:  # pragma: no cover (runs in a subprocess)
    import torch.distributed as dist

    from distill_depth.topology import Topology, plan_layout
    from distill_depth.train.checkpoint import BranchState
    from distill_depth.train.loop import _optimizer_step
    from distill_depth.train.step import StepOutcome

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        topo = Topology(plan_layout(world), rank)  # split: S on ranks 0 and 2, U on 1 and 3
        (name,) = topo.roles
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = BranchState(name, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
        before = [t.detach().clone() for t in model.state_dict().values()]
        buffers = [b.detach().clone() for b in model.buffers()]
        model(torch.randn(4, 3)).sum().backward()  # finite gradients on every rank; BatchNorm statistics move
        bad = BadSteps([name], limit=5)
        # Rank 2 alone saw a non-finite loss term (a diagnostic one: its gradients stay finite).
        bad.see(name, {"loss": 1.0, "conf_mean": math.nan if rank == 2 else 0.5})
        outcome = _optimizer_step(state, None, bad, topo.groups.get(name), torch.device("cpu"), 1, buffers)
        skipped = outcome is StepOutcome.NON_FINITE
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
        queue.put((rank, (skipped, unchanged)))
    finally:
        dist.destroy_process_group()


def test_a_bad_step_on_one_rank_is_skipped_by_its_whole_branch(tmp_path: Path) -> None:
    """4 gloo processes, split (S: ranks 0, 2; U: 1, 3): only rank 2 sees a non-finite term and every
    gradient is finite. Both S ranks skip (weights and BatchNorm statistics as before the step),
    both U ranks step: the verdict is agreed inside the branch's group, not the world."""
    from tests.gloo_procs import run_gloo

    results = run_gloo(_agree_worker, 4, tmp_path / "store")
    assert results == {0: (True, True), 2: (True, True), 1: (False, False), 3: (False, False)}


def test_fp16_scaler_backs_off_on_a_skipped_step() -> None:
    """With a grad scaler (train.mixed_precision=fp16): a step whose gradient overflowed is skipped
    and the scale halves; the next finite step updates the weights."""
    from distill_depth.train.checkpoint import BranchState
    from distill_depth.train.loop import _optimizer_step

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = BranchState("S", model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler)
    before = model.weight.detach().clone()
    bad = BadSteps(["S"], limit=3)
    scaler.scale(model(torch.full((1, 3), math.inf)).sum()).backward()
    assert _optimizer_step(state, 1.0, bad, None, torch.device("cpu"), 1, []) is StepOutcome.NON_FINITE
    assert torch.equal(model.weight, before) and scaler.get_scale() == 512.0 and bad.streak["S"] == (1, "gradient")
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    assert _optimizer_step(state, 1.0, bad, None, torch.device("cpu"), 2, []) is StepOutcome.STEPPED
    assert not torch.equal(model.weight, before) and bad.in_a_row["S"] == 0
