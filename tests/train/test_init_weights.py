"""train.init_s / train.init_u: a fresh run starts from another run's weights (the fidelity
benchmark's two-stage mode); a resume ignores them; a bad source is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_procs import launch, tiny_overrides

pytestmark = pytest.mark.slow


def _export(run: Path, branch: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / f"{branch}.safetensors"))


def test_second_stage_starts_from_the_first_stages_weights_and_a_missing_branch_is_named(tiny_shards: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    run = launch(1, tiny_overrides(tiny_shards, first, 2, "branches=[S]"), first)
    assert run.wait() == [0], run.tail()

    # lr 0: the second stage's weights stay exactly the ones it started from (BatchNorm's running
    # statistics do move: they are not parameters)
    second = tmp_path / "second"
    run = launch(1, tiny_overrides(tiny_shards, second, 1, "branches=[S]", "optim.lr=0", f"train.init_s={first}"), second)
    assert run.wait() == [0], run.tail()
    assert "branch S starts from" in run.tail(20000)
    source, started = _export(first, "S"), _export(second, "S")
    convs = [k for k in source if k.endswith("weight") and source[k].dim() == 4]
    assert convs and all(torch.equal(source[k], started[k]) for k in convs)

    fresh = tmp_path / "fresh"
    run = launch(1, tiny_overrides(tiny_shards, fresh, 1, "branches=[S]", "optim.lr=0"), fresh)
    assert run.wait() == [0], run.tail()
    assert not all(torch.equal(source[k], _export(fresh, "S")[k]) for k in convs)

    # a source without the branch asked for is one line naming it
    no_u = tmp_path / "no_u"
    run = launch(1, tiny_overrides(tiny_shards, no_u, 1, "branches=[U]", f"train.init_u={first}"), no_u)
    assert run.wait() != [0]
    assert "train.init_u: no weights for branch U" in run.tail(20000)


def test_a_u_with_a_lidar_trained_confidence_trains_exchanges_and_evaluates(tiny_shards: Path, tmp_path: Path) -> None:
    """loss.u_confidence_target=lidar end to end: U-only at half the labels learns its shown
    confidence (logged), a mutual second stage starts from it under the relative gate and the
    sensor-coverage regions, and the export evaluates with U's confidence ranked (AURG). (A U without
    the confidence net as the source: tests/test_checkpoint_io.py.)"""
    from distill_depth.cli import main

    lidar = ["loss.u_confidence_target=lidar", "data.labelled_fraction=0.5"]
    first = tmp_path / "first"
    run = launch(1, tiny_overrides(tiny_shards, first, 2, "branches=[U]", *lidar), first)
    assert run.wait() == [0], run.tail()
    logged = [m for m in run.metrics() if "U/lidar_conf_nll" in m]
    assert logged and all(0.0 < m["U/shown_conf_mean"] < 1.0 for m in logged)
    assert any(k.startswith("error_confidence.") for k in _export(first, "U"))

    second = tmp_path / "second"
    run = launch(1, tiny_overrides(tiny_shards, second, 2, *lidar, f"train.init_u={first}",
                                   "loss.distill_gate=relative", "loss.distill_regions=by_sensor_coverage"), second)
    assert run.wait() == [0], run.tail()
    assert "branch U starts from" in run.tail(20000)
    assert torch.isfinite(_export(second, "S")["lidar_reach"]).all()  # the sensor's reach was measured
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(second), "--shards", str(tiny_shards), "--protocol", "dense",
                 "--json", str(report), "--batch-size", "2"]) == 0
    import json
    import math

    mean = json.loads(report.read_text())["mean"]
    assert math.isfinite(mean["U"]["aurg"]) and math.isfinite(mean["fused"]["abs_rel"])

