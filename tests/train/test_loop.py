"""One process, both branches (colocated): one real run of ``distill-depth train`` on the bundled
shards, checked by two tests (one process start instead of two: the suite runs on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.wandb_log import log_content
from train_procs import Run, launch

pytestmark = pytest.mark.slow

STEPS = 12
LOGGED_KEYS = ("S/loss", "S/sup_nll", "U/loss", "U/photo_nll", "S/lr", "U/lr", "samples_per_s",
               "time/exchange_s", "time/wait_s", "val/S/abs_rel", "val/U/a1", "images/panel/0", "images/panel/3")


@pytest.fixture(scope="module")
def colocated_run(bundled_shards: Path, module_tmp_path: Path) -> tuple[Run, list[int]]:
    """STEPS steps overfitting one batch of the bundled shards, validation and images at the end,
    W&B offline."""
    out = module_tmp_path / "colocated" / "run"
    overrides = [
        f"data.train_shards={bundled_shards / 'train'}", f"data.val_shards={bundled_shards / 'val'}",
        "data.batch_size=1", "data.num_workers=0", f"train.max_steps={STEPS}", f"train.output_dir={out}",
        "train.log_every=1", f"train.image_every={STEPS // 2}", f"train.val_every={STEPS}", "train.val_batches=1",
        "train.report_to=wandb", "train.overfit_batches=1", "optim.lr=1e-3", "optim.schedule=constant",
        "optim.warmup_steps=0",
    ]
    run = launch(1, overrides, out, WANDB_MODE="offline")
    return run, run.wait()


def test_colocated_on_bundled_shards_with_wandb_offline(colocated_run: tuple[Run, list[int]]) -> None:
    """Finite losses for both branches, validation of both, and an offline W&B run folder holding
    every logged key and the depth/confidence images."""
    run, codes = colocated_run
    out = run.out
    assert codes == [0], run.tail()
    metrics = run.metrics()
    losses = [m[k] for m in metrics for k in ("S/loss", "U/loss") if k in m]
    assert len(losses) == 2 * STEPS and all(math.isfinite(v) for v in losses)
    assert any("val/S/abs_rel" in m and math.isfinite(m["val/S/abs_rel"]) for m in metrics)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    content = log_content(run_file)
    for key in LOGGED_KEYS:
        assert key.encode() in content, key
    images = list(run_file.parent.glob("files/media/images/**/*.png"))
    assert {p.parent.name for p in images} == {"panel"}
    assert (out / "export" / "S.safetensors").is_file() and (out / "export" / "config.yaml").is_file()


def test_losses_fall_on_a_fixed_batch(colocated_run: tuple[Run, list[int]]) -> None:
    """Overfitting one batch for STEPS steps lowers both branches' losses (the optimisers really step)."""
    run, codes = colocated_run
    assert codes == [0], run.tail()
    metrics = run.metrics()
    for name in ("S", "U"):
        series = [m[f"{name}/loss"] for m in metrics if f"{name}/loss" in m]
        assert len(series) == STEPS and all(math.isfinite(v) for v in series)
        assert sum(series[-3:]) / 3 < sum(series[:3]) / 3, f"{name}: {series}"


def test_the_final_export_is_a_wandb_model_artifact(colocated_run: tuple[Run, list[int]]) -> None:
    """train.report_to=wandb: the offline run records a model artifact whose entries are the export's
    files, each with the MD5 of the file on disk (the digest W&B checks on upload)."""
    import base64
    import hashlib

    run, codes = colocated_run
    assert codes == [0], run.tail()
    (run_file,) = (run.out / "wandb").glob("offline-run-*/run-*.wandb")
    content = log_content(run_file)
    run_id = run_file.stem.removeprefix("run-")
    assert f"export-{run_id}".encode() in content and b"model" in content and b"step-12" in content
    for name in ("S.safetensors", "U.safetensors", "config.yaml"):
        digest = base64.b64encode(hashlib.md5((run.out / "export" / name).read_bytes()).digest())
        assert name.encode() in content and digest in content, name


def test_panels_show_the_same_validation_samples_at_every_log(colocated_run: tuple[Run, list[int]]) -> None:
    """One panel per sample, input | S depth | U depth | S conf | U conf | LiDAR at 96x320 (5 gaps of
    2 px), logged at steps 6 and 12: the input and LiDAR thirds are identical (a fixed batch), the
    depth differs (the branches trained in between)."""
    import numpy as np
    from PIL import Image

    run, codes = colocated_run
    assert codes == [0], run.tail()
    (media,) = (run.out / "wandb").glob("offline-run-*/files/media/images/**/panel")
    first = sorted(media.glob("0_*.png"), key=lambda p: int(p.name.split("_")[1]))
    assert len(first) == 2 and len(list(media.glob("*.png"))) == 8  # 4 samples x steps 6 and 12
    early, late = (np.asarray(Image.open(p).convert("RGB")) for p in first)
    assert early.shape == (96, 6 * 320 + 5 * 2, 3)
    column = lambda k: slice(k * 322, k * 322 + 320)  # noqa: E731
    assert np.array_equal(early[:, column(0)], late[:, column(0)])  # the input image
    assert np.array_equal(early[:, column(5)], late[:, column(5)])  # the LiDAR
    assert not np.array_equal(early[:, column(1)], late[:, column(1)])  # S depth moved on
    assert early[:, column(5)].max() > 0 and early[:, column(0)].std() > 0
