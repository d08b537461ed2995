"""`evaluate --protocol cityscapes`: ManyDepth's crop and numbers, recomputed independently in numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_depth.cli import main
from distill_depth.data.stream import eval_batches
from distill_depth.evaluation.protocol import PROTOCOLS, cityscapes_crop_mask, evaluation_mask, prepare_prediction
from distill_depth.metrics import METRIC_NAMES, depth_metrics

PROTOCOL = PROTOCOLS["cityscapes"]


def manydepth_metrics(pred: np.ndarray, gt: np.ndarray, median_scaling: bool) -> dict[str, float]:
    """The protocol as ManyDepth's evaluation states it, on a ground truth already cut to 3/4 height."""
    height, width = gt.shape
    rows, cols = slice(256 * height // 768, height), slice(192 * width // 2048, 1856 * width // 2048)
    gt, pred = gt[rows, cols].astype(np.float64), pred[rows, cols].astype(np.float64)
    mask = (gt > 1e-3) & (gt < 80)
    gt, pred = gt[mask], pred[mask]
    if median_scaling:
        pred = pred * np.median(gt) / np.median(pred)
    pred = np.clip(pred, 1e-3, 80)
    ratio = np.maximum(gt / pred, pred / gt)
    return {"abs_rel": np.mean(np.abs(gt - pred) / gt), "sq_rel": np.mean((gt - pred) ** 2 / gt),
            "rmse": np.sqrt(np.mean((gt - pred) ** 2)), "rmse_log": np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2)),
            "a1": np.mean(ratio < 1.25), "a2": np.mean(ratio < 1.25 ** 2), "a3": np.mean(ratio < 1.25 ** 3)}


def test_crop_is_manydepths_rows_and_columns_at_full_and_reduced_size():
    full = cityscapes_crop_mask(768, 2048)
    rows, cols = torch.nonzero(full.any(1))[:, 0], torch.nonzero(full.any(0))[:, 0]
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (256, 767, 192, 1855)
    assert int(full.sum()) == 512 * 1664
    small = cityscapes_crop_mask(192, 512)
    assert torch.equal(small, full[::4, ::4])  # the same region at a quarter of the size
    assert PROTOCOL.ground_truth == "gt_depth" and not PROTOCOL.garg_crop and "centre_crop" in PROTOCOL.describe()


@pytest.fixture(scope="module")
def shards(module_tmp_path) -> Path:
    base = module_tmp_path / "cityscapes_eval"
    assert main(["synth", "--layout", "cityscapes", "--out", str(base / "cs"), "--frames", "3", "--height", "64",
                 "--width", "128", "--split", "test"]) == 0
    assert main(["make-shards", "--dataset", "cityscapes", "--root", str(base / "cs"), "--split", "test",
                 "--out", str(base / "shards"), "--height", "24", "--width", "64", "--gt-full-res",
                 "--workers", "1", "--no-progress"]) == 0
    return base / "shards"


@pytest.mark.parametrize("median_scaling", [True, False])
def test_protocol_numbers_equal_an_independent_recomputation(shards, median_scaling):
    (batch,) = list(eval_batches(str(shards), 4, 0, 1))
    gt = batch.gt_depth
    assert tuple(gt.shape) == (2, 1, 48, 128)  # --gt-full-res: the cropped native size, not 24x64
    rng = np.random.default_rng(0)
    pred = gt.clamp(min=1.0) * torch.from_numpy(rng.uniform(0.6, 1.6, gt.shape)).float() * 3.0
    mask = evaluation_mask(gt, PROTOCOL)
    final, _ = prepare_prediction(pred, gt, mask, PROTOCOL, median_scaling=median_scaling)
    ours = depth_metrics(final, gt, mask)
    for i in range(gt.shape[0]):
        theirs = manydepth_metrics(pred[i, 0].numpy(), gt[i, 0].numpy(), median_scaling)
        for name in METRIC_NAMES:
            assert float(ours[name][i]) == pytest.approx(theirs[name], rel=1e-6, abs=1e-9), name


# --------------------------------------------------------------------------------------------
# the real command on a briefly trained checkpoint

from tests.trained_checkpoint import trained_run  # noqa: E402


@pytest.mark.slow
def test_evaluate_cli_reports_the_cityscapes_protocol(tmp_path_factory, bundled_shards, shards, tmp_path, capsys):
    run_dir = trained_run(tmp_path_factory, bundled_shards)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--shards", str(shards), "--protocol", "cityscapes",
                 "--branch", "S", "--median-scaling", "on", "--json", str(out),
                 "--save-predictions", str(tmp_path / "pred")]) == 0
    assert "centre crop rows 256..768" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["protocol"]["name"] == "cityscapes" and report["num_images"] == 2
    gts = {key: gt[0].numpy() for batch in eval_batches(str(shards), 4, 0, 1)
           for key, gt in zip(batch.keys, batch.gt_depth)}
    for record in report["per_image"]:
        final = np.load(tmp_path / "pred" / f"{record['key']}_S.npy")  # scaled and clamped already
        theirs = manydepth_metrics(final, gts[record["key"]], median_scaling=False)
        assert record["abs_rel"] == pytest.approx(theirs["abs_rel"], rel=1e-5)
        assert record["a1"] == pytest.approx(theirs["a1"], abs=1e-9)
