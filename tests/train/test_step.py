"""The branch's update at the step boundary (``train/step.py``): a step without gradient is skipped,
so AdamW's momentum never moves weights on a batch that taught the branch nothing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_depth.train.checkpoint import BranchState, checkpoint_dir
from distill_depth.train.nonfinite import BadSteps
from distill_depth.train.step import StepOutcome, optimizer_step

from train_procs import launch, tiny_overrides


def _state(scaler: torch.amp.GradScaler | None = None) -> BranchState:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    return BranchState("S", model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler)


def _step(state: BranchState, bad: BadSteps, step: int, scale: float) -> StepOutcome:
    loss = scale * state.model(torch.ones(1, 3)).sum()  # scale 0: the graph exists, every gradient is 0
    (state.scaler.scale(loss) if state.scaler else loss).backward()
    return optimizer_step(state, None, bad, None, torch.device("cpu"), step, [])


def test_a_step_without_gradient_leaves_the_weights_and_the_optimiser_as_they_were() -> None:
    state, bad = _state(), BadSteps(["S"], limit=3)
    assert _step(state, bad, 1, 1.0) is StepOutcome.STEPPED
    weights = [p.detach().clone() for p in state.model.parameters()]
    moments = {k: v.clone() for k, v in state.optimizer.state_dict()["state"][0].items()}
    # what the update would have done: AdamW moves the weights by its momentum and decay alone
    shadow = _state()
    shadow.model.load_state_dict(state.model.state_dict())
    shadow.optimizer.load_state_dict(copy.deepcopy(state.optimizer.state_dict()))  # loading shares tensors
    for p in shadow.model.parameters():
        p.grad = torch.zeros_like(p)
    shadow.optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, shadow.model.parameters()))

    assert _step(state, bad, 2, 0.0) is StepOutcome.NO_GRADIENT
    assert all(torch.equal(a, b) for a, b in zip(weights, state.model.parameters()))
    after = state.optimizer.state_dict()["state"][0]
    assert all(torch.equal(moments[k], after[k]) for k in moments)  # step count and moments untouched
    assert bad.in_a_row["S"] == 0 and state.scheduler.last_epoch == 2  # not a bad step; the schedule goes on
    assert _step(state, bad, 3, 1.0) is StepOutcome.STEPPED
    assert not all(torch.equal(a, b) for a, b in zip(weights, state.model.parameters()))


def test_a_step_without_gradient_under_the_fp16_scaler_keeps_the_scale() -> None:
    """The scaler was unscaled for the check: its per-step state is reset (the next step would
    raise otherwise) and its scale is kept (nothing overflowed)."""
    state, bad = _state(torch.amp.GradScaler("cpu", init_scale=1024.0)), BadSteps(["S"], limit=3)
    assert _step(state, bad, 1, 0.0) is StepOutcome.NO_GRADIENT
    assert state.scaler.get_scale() == 1024.0
    assert _step(state, bad, 2, 1.0) is StepOutcome.STEPPED


def test_a_step_with_a_nonfinite_gradient_is_not_taken_for_one_without() -> None:
    state, bad = _state(), BadSteps(["S"], limit=3)
    assert _step(state, bad, 1, math.inf) is StepOutcome.NON_FINITE
    assert bad.in_a_row["S"] == 1


@pytest.mark.slow
def test_s_only_at_a_low_label_fraction_skips_exactly_its_unlabelled_steps(tiny_shards: Path, tmp_path: Path) -> None:
    """A real S-only run, batch 1, half the samples labelled: the steps whose sample had no label
    log ``S/no_gradient_share`` 1 and leave S's weights bit-identical; the labelled steps move them.
    (Before, AdamW's momentum moved the weights on every unlabelled step.)"""
    out = tmp_path / "run"
    steps = 8
    overrides = tiny_overrides(tiny_shards, out, steps, "branches=[S]", "data.batch_size=1", "data.labelled_fraction=0.5",
                               "data.label_seed=1", "train.ckpt_every=1", f"train.keep_last={steps}", "train.report_to=none")
    run = launch(1, overrides, out)
    assert run.wait() == [0], run.tail()
    share = {m["step"]: m["S/no_gradient_share"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "S/no_gradient_share" in m}
    assert sorted(share) == list(range(1, steps + 1))
    labelled = {m["step"]: m["S/labelled_share"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "S/labelled_share" in m}
    assert all(share[k] == (1.0 if labelled[k] == 0.0 else 0.0) for k in share)
    assert 0 < sum(share.values()) < steps, share  # the subset gave both kinds of step

    def weights(step: int) -> dict[str, torch.Tensor]:
        return {k: v for k, v in load_file(checkpoint_dir(out, step) / "S" / "model.safetensors").items()
                if "running" not in k and "num_batches" not in k}  # BatchNorm statistics follow the images

    for step in range(2, steps + 1):
        before, after = weights(step - 1), weights(step)
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert unchanged == (share[step] == 1.0), step
