"""Checkpoints: atomic step folders, keep-last, RNG and data position, exports, load_branches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_depth.branches import build_branch
from distill_depth.config import load_config
from distill_depth.train.checkpoint import (
    BranchState, CheckpointError, DataPosition, complete_checkpoints, export_branches, load_branches,
    load_checkpoint, resolve_resume, save_checkpoint, write_export_meta,
)
from distill_depth.train.optim import build_optimizer, build_scheduler


def _state(name: str, cfg, seed: int) -> BranchState:
    torch.manual_seed(seed)
    model = build_branch(name, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    return BranchState(name, model, optimizer, build_scheduler(optimizer, 10, cfg.optim))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config(None, [f"train.output_dir={tmp_path_factory.mktemp('ckpt') / 'run'}"])


def test_save_keep_last_resume_and_load_branches(cfg) -> None:
    out = Path(cfg.train.output_dir)
    branches = [_state("S", cfg, 0), _state("U", cfg, 1)]
    placement = {"mode": "colocated", "ratio": 1, "branches": ["S", "U"]}
    for step in (2, 4):
        branches[0].optimizer.step()  # no gradients: a no-op that keeps the scheduler's order check quiet
        branches[0].scheduler.step()
        torch.manual_seed(77)
        save_checkpoint(out, step, DataPosition(1, step), branches, {"S", "U"}, 0, 1, cfg, placement, keep_last=1)
    expected_draw = torch.rand(3)
    (out / "checkpoints" / "step_00000009").mkdir()  # a crash before the marker: never picked
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000004"]
    assert not list((out / "checkpoints").glob(".tmp_*"))
    assert resolve_resume("auto", out).name == "step_00000004"
    assert resolve_resume("none", out) is None

    fresh = [_state("S", cfg, 5), _state("U", cfg, 6)]
    step, position = load_checkpoint(resolve_resume("auto", out), fresh, 0, torch.device("cpu"))
    assert (step, position) == (4, DataPosition(1, 4))
    assert fresh[0].scheduler.last_epoch == branches[0].scheduler.last_epoch == 2
    for a, b in zip(branches, fresh):
        for (key, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(x, y), key
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the checkpoint left it

    models, loaded_cfg = load_branches(out, names=("S",))
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert torch.equal(next(iter(models["S"].state_dict().values())), next(iter(branches[0].model.state_dict().values())))
    assert not models["S"].training

    export_branches(out, {"U": branches[1].model})
    write_export_meta(out, cfg, 4)
    models, _ = load_branches(out / "export", names=("U",))
    assert torch.equal(models["U"].pose_net.state_dict()[next(iter(models["U"].pose_net.state_dict()))],
                       branches[1].model.pose_net.state_dict()[next(iter(branches[1].model.pose_net.state_dict()))])
    with pytest.raises(CheckpointError, match="S"):
        load_branches(out / "export", names=("S",))
    with pytest.raises(CheckpointError):
        load_branches(out / "nothing-here")
    with pytest.raises(CheckpointError):
        resolve_resume(str(out / "export"), out)
