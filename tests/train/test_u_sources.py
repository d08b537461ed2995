"""The paper's three U modes (M / S / MS) train end to end: real ``distill-depth train`` processes
on the bundled shards (which carry stereo.jpg) and on mono shards made without ``--stereo``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_procs import REPO, child_env, launch, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 2


def _overrides(shards: Path, out: Path, sources: str) -> list[str]:
    """Both branches, one process, checkpoints after each step (so weights can be compared)."""
    return [
        f"data.train_shards={shards}", "data.val_shards=null", "data.batch_size=1", "data.num_workers=0",
        "data.shuffle_buffer=4", f"data.u_sources={sources}", f"train.max_steps={STEPS}",
        f"train.output_dir={out}", "train.log_every=1", "train.val_every=0", "train.image_every=0",
        "train.ckpt_every=1", "train.keep_last=2", "optim.warmup_steps=0", "optim.lr=1e-3",
    ]


def _u_state(out: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    folder = out / "checkpoints" / f"step_{step:08d}" / "U"
    return load_file(str(folder / "model.safetensors")), torch.load(folder / "optimizer.pt", weights_only=False)


@pytest.mark.parametrize("sources", ["temporal", "stereo", "temporal+stereo"])
def test_each_u_mode_trains_on_the_bundled_shards(bundled_shards: Path, tmp_path: Path, sources: str) -> None:
    """Finite losses for both branches. Stereo-only: no pose-net weight in U's checkpoint and no
    pose parameter in its optimiser state (one param group, as many states as depth-net tensors);
    with temporal sources the pose net is there, optimised, and its weights change."""
    out = tmp_path / "run"
    run = launch(1, _overrides(bundled_shards / "train", out, sources), out)
    assert run.wait() == [0], run.tail()
    losses = [m[k] for m in run.metrics() for k in ("S/loss", "U/loss") if k in m]
    assert len(losses) == 2 * STEPS and all(math.isfinite(v) for v in losses)
    first, first_optim = _u_state(out, 1)
    last, last_optim = _u_state(out, STEPS)
    pose_keys = [k for k in last if k.startswith("pose_net.")]
    depth_keys = [k for k in last if k.startswith("depth_net.")]
    groups = last_optim["param_groups"]
    if sources == "stereo":
        assert pose_keys == []
        assert len(groups) == 1 and len(last_optim["state"]) <= len(depth_keys)
    else:
        assert pose_keys and len(groups) == 2
        pose_ids = groups[1]["params"]
        assert all(i in last_optim["state"] for i in pose_ids)  # Adam moments: the pose net was stepped
        assert any(not torch.equal(first[k], last[k]) for k in pose_keys)
    assert any(not torch.equal(first[k], last[k]) for k in depth_keys)
    assert first_optim["param_groups"][0]["params"] == groups[0]["params"]


@pytest.fixture(scope="module")
def mono_shards(module_tmp_path: Path) -> Path:
    """A synthetic drive made into shards WITHOUT --stereo (no stereo.jpg, manifest stereo: false)."""
    base = module_tmp_path / "mono"
    env = child_env()
    subprocess.run([sys.executable, "-m", "distill_depth.cli", "synth", "--out", str(base / "raw"), "--drives", "1",
                    "--frames", "6", "--height", "64", "--width", "128", "--azimuth-steps", "300"],
                   check=True, env=env, capture_output=True, timeout=300, cwd=REPO)
    subprocess.run([sys.executable, "-m", "distill_depth.cli", "make-shards", "--kitti-root", str(base / "raw"),
                    "--out", str(base / "train"), "--samples-per-shard", "2", "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=300, cwd=REPO)
    return base / "train"


def test_monocular_mode_trains_without_stereo_in_the_shards(mono_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = launch(1, tiny_overrides(mono_shards, out, 1, "data.u_sources=temporal", "data.val_shards=null"), out)
    assert run.wait() == [0], run.tail()
    assert any("U/loss" in m and math.isfinite(m["U/loss"]) for m in run.metrics())


@pytest.mark.parametrize("sources", ["stereo", "temporal+stereo"])
def test_stereo_modes_on_mono_shards_fail_clearly(mono_shards: Path, tmp_path: Path, sources: str) -> None:
    """Exit code 2 and one line naming the shards and the flag that makes them."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "distill_depth.cli", "train",
         *tiny_overrides(mono_shards, out, 1, f"data.u_sources={sources}", "data.val_shards=null")],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(mono_shards) in result.stderr and "make-shards --stereo" in result.stderr
    assert "Traceback" not in result.stderr
