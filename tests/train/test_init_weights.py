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


def test_second_stage_starts_from_the_first_stages_weights(tiny_shards: Path, tmp_path: Path) -> None:
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


def test_missing_source_branch_is_named(tiny_shards: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert launch(1, tiny_overrides(tiny_shards, first, 1, "branches=[S]"), first).wait() == [0]
    second = tmp_path / "second"
    run = launch(1, tiny_overrides(tiny_shards, second, 1, "branches=[U]", f"train.init_u={first}"), second)
    assert run.wait() != [0]
    assert "train.init_u: no weights for branch U" in run.tail(20000)
