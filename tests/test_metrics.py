"""Known answers for the depth metrics, protocol masks, median scaling and AUSE/AURG."""

from __future__ import annotations

import math

import pytest
import torch

from distill_depth.metrics import (
    METRIC_NAMES,
    ause_aurg,
    depth_metrics,
    garg_crop_mask,
    median_scale,
    range_mask,
    sparsification_curves,
)


def _map(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, len(values), len(values[0]))


def test_hand_computed_example():
    # Four pixels, one invalid (gt = 0). Valid pairs (pred, gt): (2, 1), (4, 4), (3, 2).
    pred = _map([[2.0, 4.0], [3.0, 7.0]])
    gt = _map([[1.0, 4.0], [2.0, 0.0]])
    valid = gt > 0
    m = depth_metrics(pred, gt, valid)
    assert set(m) == set(METRIC_NAMES)
    assert all(v.shape == (1,) and v.dtype == torch.float64 for v in m.values())
    # abs_rel = (1/1 + 0/4 + 1/2) / 3 ; sq_rel = (1/1 + 0 + 1/2) / 3 ; rmse = sqrt((1 + 0 + 1)/3)
    assert m["abs_rel"].item() == 0.5
    assert m["sq_rel"].item() == 0.5
    assert m["rmse"].item() == math.sqrt(2.0 / 3.0)
    expected_log = math.sqrt((math.log(2.0) ** 2 + 0.0 + math.log(1.5) ** 2) / 3.0)
    assert m["rmse_log"].item() == pytest.approx(expected_log, rel=1e-12, abs=0)
    # ratios 2, 1, 1.5: < 1.25 → 1 of 3; < 1.5625 → 2 of 3 (1.5); < 1.953125 → 2 of 3 (2 is not).
    assert m["a1"].item() == pytest.approx(1 / 3, abs=1e-15)
    assert m["a2"].item() == pytest.approx(2 / 3, abs=1e-15)
    assert m["a3"].item() == pytest.approx(2 / 3, abs=1e-15)


def test_metrics_are_per_image_and_nan_without_valid_pixels():
    gt = torch.full((3, 1, 2, 2), 10.0)
    pred = gt.clone()
    pred[1] = 20.0
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[2] = False
    m = depth_metrics(pred, gt, valid)
    assert m["abs_rel"][0].item() == 0.0 and m["a1"][0].item() == 1.0
    assert m["abs_rel"][1].item() == 1.0 and m["rmse"][1].item() == 10.0 and m["a1"][1].item() == 0.0
    assert all(math.isnan(m[k][2].item()) for k in METRIC_NAMES)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="B, 1, H, W"):
        depth_metrics(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3), torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_garg_crop_selects_the_standard_rectangle():
    mask = garg_crop_mask(375, 1242)
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    # int(0.40810811*375)=153, int(0.99189189*375)=371 (exclusive); int(.03594771*1242)=44, int(.96405229*1242)=1197
    assert (rows.min().item(), rows.max().item()) == (153, 370)
    assert (cols.min().item(), cols.max().item()) == (44, 1196)
    assert mask.sum().item() == (371 - 153) * (1197 - 44)
    small = garg_crop_mask(10, 100)
    assert small[4:9, 3:96].all() and small.sum().item() == 5 * 93


def test_range_mask_excludes_missing_and_far_points():
    gt = torch.tensor([0.0, 5e-4, 0.002, 10.0, 79.9, 80.0, 120.0]).view(1, 1, 1, 7)
    assert range_mask(gt).flatten().tolist() == [False, False, True, True, True, False, False]


def test_median_scaling_makes_a_scaled_prediction_perfect():
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 6, 7) * 50 + 1
    gt[0, 0, 0, :3] = 0  # some missing ground truth
    pred = gt * torch.tensor([0.1, 3.0]).view(2, 1, 1, 1) + (gt == 0) * 5.0
    valid = gt > 0
    scaled, ratio = median_scale(pred, gt, valid)
    assert ratio.tolist() == pytest.approx([10.0, 1 / 3.0], rel=1e-6)
    m = depth_metrics(scaled, gt, valid)
    assert m["abs_rel"].max().item() < 1e-6 and m["a1"].min().item() == 1.0


def test_median_is_mean_of_middle_values_for_even_counts():
    gt = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    pred = torch.ones_like(gt)
    _, ratio = median_scale(pred, gt, gt > 0)
    assert ratio.item() == 2.5


def _errors_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 1, 16, 16, generator=g) * 40 + 1
    pred = gt * (1 + 0.5 * torch.randn(2, 1, 16, 16, generator=g)).clamp(min=0.1)
    valid = torch.rand(2, 1, 16, 16, generator=g) > 0.2
    return pred, gt, valid


@pytest.mark.parametrize("error", ["abs_rel", "rmse"])
def test_ause_of_oracle_confidence_is_zero_and_random_is_larger(error):
    pred, gt, valid = _errors_case()
    # The oracle ranks by the error the curve measures: relative for abs_rel, absolute for rmse.
    true_error = (pred - gt).abs() / gt if error == "abs_rel" else (pred - gt).abs()
    ause, aurg = ause_aurg(pred, gt, valid, confidence=-true_error, error=error)
    assert ause.abs().max().item() < 1e-12
    assert (aurg > 0).all()
    random_conf = torch.rand(pred.shape, generator=torch.Generator().manual_seed(1))
    ause_random, aurg_random = ause_aurg(pred, gt, valid, confidence=random_conf, error=error)
    assert (ause_random > 0.01).all()
    assert (aurg_random < aurg).all()


def test_sparsification_curves_known_values():
    # Errors 0.1, 0.2, 0.3, 0.4 (gt = 10, pred = 11..14); confidence prefers the worst pixels.
    gt = torch.full((1, 1, 1, 4), 10.0)
    pred = torch.tensor([11.0, 12.0, 13.0, 14.0]).view(1, 1, 1, 4)
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6]).view(1, 1, 1, 4)
    fractions, curve, oracle, full = sparsification_curves(pred, gt, gt > 0, conf, steps=4)
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert curve[0].tolist() == pytest.approx([0.25, 0.2, 0.15, 0.1])
    assert oracle[0].tolist() == pytest.approx([0.25, 0.2, 0.15, 0.1])
    assert full.item() == pytest.approx(0.25)
    _, bad, _, _ = sparsification_curves(pred, gt, gt > 0, -conf, steps=4)
    assert bad[0].tolist() == pytest.approx([0.25, 0.3, 0.35, 0.4])
