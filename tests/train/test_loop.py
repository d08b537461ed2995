"""One process, both branches (colocated): real runs of ``distill-depth train``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from train_procs import launch, tiny_overrides

pytestmark = pytest.mark.slow

LOGGED_KEYS = ("S/loss", "S/sup_nll", "U/loss", "U/photo_nll", "S/lr", "U/lr", "samples_per_s",
               "time/exchange_s", "time/wait_s", "val/S/abs_rel", "val/U/a1", "images/S/depth", "images/U/confidence")


def test_colocated_on_bundled_shards_with_wandb_offline(bundled_shards: Path, tmp_path: Path) -> None:
    """2 steps on the bundled shards: finite losses for both branches, validation of both, and an
    offline W&B run folder holding every logged key and the depth/confidence images."""
    out = tmp_path / "run"
    overrides = [
        f"data.train_shards={bundled_shards / 'train'}", f"data.val_shards={bundled_shards / 'val'}",
        "data.batch_size=1", "data.num_workers=0", "train.max_steps=2", f"train.output_dir={out}",
        "train.log_every=1", "train.image_every=2", "train.val_every=2", "train.val_batches=1",
        "train.report_to=wandb",
    ]
    run = launch(1, overrides, out, WANDB_MODE="offline")
    assert run.wait() == [0], run.tail()
    metrics = run.metrics()
    losses = [m[k] for m in metrics for k in ("S/loss", "U/loss") if k in m]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert any("val/S/abs_rel" in m and math.isfinite(m["val/S/abs_rel"]) for m in metrics)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    content = run_file.read_bytes()
    for key in LOGGED_KEYS:
        assert key.encode() in content, key
    images = list(run_file.parent.glob("files/media/images/**/*.png"))
    assert {p.parent.name for p in images} == {"S", "U"}
    assert (out / "export" / "S.safetensors").is_file() and (out / "export" / "config.yaml").is_file()


def test_losses_fall_on_a_fixed_batch(tiny_shards: Path, tmp_path: Path) -> None:
    """Overfitting one batch for 8 steps lowers both branches' losses (the optimisers really step)."""
    out = tmp_path / "run"
    run = launch(1, tiny_overrides(tiny_shards, out, 8, "train.overfit_batches=1", "optim.lr=1e-3",
                                   "optim.schedule=constant", "data.num_workers=0"), out)
    assert run.wait() == [0], run.tail()
    metrics = run.metrics()
    for name in ("S", "U"):
        series = [m[f"{name}/loss"] for m in metrics if f"{name}/loss" in m]
        assert len(series) == 8 and all(math.isfinite(v) for v in series)
        assert sum(series[-3:]) / 3 < sum(series[:3]) / 3, f"{name}: {series}"
