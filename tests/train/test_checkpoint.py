"""Checkpoints: atomic step folders, keep-last, RNG and data position, exports, load_branches;
manifests that verify them, fallback past a bad one, safe loading."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_depth.branches import build_branch
from distill_depth.config import load_config
from distill_depth.train.checkpoint import (
    BranchState, CheckpointCorrupt, CheckpointError, DataPosition, complete_checkpoints, export_branches,
    file_record, load_branches, load_checkpoint, resolve_resume, save_checkpoint, verify_checkpoint,
    write_export_meta, write_manifest,
)
from distill_depth.train.optim import build_optimizer, build_scheduler

from train_procs import RunsCode


def _state(name: str, cfg, seed: int) -> BranchState:
    torch.manual_seed(seed)
    model = build_branch(name, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    return BranchState(name, model, optimizer, build_scheduler(optimizer, 10, cfg.optim))


@pytest.fixture(scope="module")
def cfg(module_tmp_path):
    return load_config(None, [f"train.output_dir={module_tmp_path / 'ckpt' / 'run'}"])


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


def _two_checkpoints(tmp_path: Path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    out = Path(cfg.train.output_dir)
    branches = [_state("S", cfg, 0), _state("U", cfg, 1)]
    placement = {"mode": "colocated", "ratio": 1, "branches": ["S", "U"]}
    for step in (2, 4):
        save_checkpoint(out, step, DataPosition(0, step), branches, {"S", "U"}, 0, 1, cfg, placement, keep_last=2)
    return cfg, out, branches


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_checkpoint_manifest_records_every_file(tmp_path: Path) -> None:
    _, out, _ = _two_checkpoints(tmp_path)
    newest = complete_checkpoints(out)[-1]
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(newest).as_posix() for p in newest.rglob("*")
               if p.is_file() and p.name not in ("manifest.json", "COMPLETE")}
    assert set(manifest) == on_disk and "S/optimizer.pt" in manifest and "rng/rank_00000.pt" in manifest
    record = manifest["S/model.safetensors"]
    assert record["bytes"] == (newest / "S/model.safetensors").stat().st_size
    assert record["sha256"] == hashlib.sha256((newest / "S/model.safetensors").read_bytes()).hexdigest()
    assert verify_checkpoint(newest) is True


def test_truncated_newest_checkpoint_falls_back_and_is_named(tmp_path: Path, caplog) -> None:
    """A newest checkpoint whose S/model.safetensors was cut short after COMPLETE: auto resume logs
    the file and takes the previous complete checkpoint; an explicit path and load_branches (what
    evaluate/predict call) fail with an error naming the file."""
    _, out, _ = _two_checkpoints(tmp_path)
    older, newest = complete_checkpoints(out)
    bad = newest / "S" / "model.safetensors"
    _truncate(bad)
    with caplog.at_level(logging.WARNING, logger="distill_depth.train.checkpoint"):
        assert resolve_resume("auto", out) == older
    assert str(bad) in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(bad))):
        resolve_resume(str(newest), out)
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(bad))):
        load_branches(newest, names=("S",))
    load_branches(newest, names=("U",))  # the files it reads are intact
    (older / "rng" / "rank_00000.pt").write_bytes(b"rot")  # same failure everywhere: an error, no silent restart
    with pytest.raises(CheckpointCorrupt, match="all 2 complete checkpoint"):
        resolve_resume("auto", out)


def test_resume_path_that_is_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(CheckpointError, match="is no checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """optimizer.pt replaced by a pickle that runs code, manifest and COMPLETE rewritten to match
    (what an attacker with write access does): refused with an error naming the file; the code
    never runs. Loading the same file with weights_only=False would run it."""
    cfg, out, _ = _two_checkpoints(tmp_path)
    newest = complete_checkpoints(out)[-1]
    marker = tmp_path / "pwned"
    hostile = newest / "S" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": RunsCode(marker)}, hostile)
    files = json.loads((newest / "manifest.json").read_text())["files"]
    files["S/optimizer.pt"] = file_record(hostile)
    (newest / "COMPLETE").write_text(f"step 4\nmanifest sha256 {write_manifest(newest, files)}\n")
    assert resolve_resume("auto", out) == newest  # the check passes: the file is what the manifest says
    fresh = [_state("S", cfg, 5), _state("U", cfg, 6)]
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(hostile)) + r".*refused.*\(io.open\)"):
        load_checkpoint(newest, fresh, 0, torch.device("cpu"))
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.exists()


def test_checkpoint_from_before_manifests_still_loads(tmp_path: Path) -> None:
    """No manifest.json, RNG file with numpy's pickled generator state (the old format): loads,
    RNG restored."""
    cfg, out, _ = _two_checkpoints(tmp_path)
    newest = complete_checkpoints(out)[-1]
    (newest / "manifest.json").unlink()
    (newest / "COMPLETE").write_text("step 4\n")
    np.random.seed(3)
    random.seed(4)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               newest / "rng" / "rank_00000.pt")
    expected = (np.random.rand(), random.random())
    np.random.seed(99)
    random.seed(99)
    assert resolve_resume("auto", out) == newest
    step, _ = load_checkpoint(newest, [_state("S", cfg, 5), _state("U", cfg, 6)], 0, torch.device("cpu"))
    assert step == 4 and (np.random.rand(), random.random()) == expected
