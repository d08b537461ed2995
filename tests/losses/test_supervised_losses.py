"""L_sup' and point filtering: known optima, exact values, and defined behaviour on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from distill_depth.losses import (
    confidence_nll,
    depth_error,
    lidar_confidence_nll,
    point_filtering,
    point_filtering_held_out,
    point_filtering_prior,
    split_held_out,
    sup_confidence_nll,
)


def _maps(value: float, shape=(2, 1, 4, 6)) -> torch.Tensor:
    return torch.full(shape, value)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_confidence_optimum_is_min_one_tau_over_error() -> None:
    """Gradient descent on C (one pixel per error value) lands on C* = min(1, τ/ρ)."""
    tau = 0.1
    errors = torch.tensor([0.02, 0.1, 0.2, 0.5, 1.0]).view(1, 1, 1, -1)
    logit = torch.zeros_like(errors, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.15)
    mask = torch.ones_like(errors, dtype=torch.bool)
    for _ in range(300):
        loss = confidence_nll(errors, torch.sigmoid(logit), mask, tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
    found = torch.sigmoid(logit).flatten()
    expected = (tau / errors.flatten()).clamp(max=1.0)
    capped = expected == 1.0
    assert (found[capped] > 0.97).all()
    torch.testing.assert_close(found[~capped], expected[~capped], atol=0.01, rtol=0)


def test_sup_nll_value_log_and_l1() -> None:
    depth, target = _maps(2.0), _maps(4.0)
    conf = _maps(0.5)
    mask = torch.ones_like(depth, dtype=torch.bool)
    log_loss = sup_confidence_nll(depth, conf, target, mask, tau=0.1, rho="log")
    assert log_loss.item() == pytest.approx(0.5 * math.log(2.0) / 0.1 - math.log(0.5), rel=1e-5)
    l1_loss = sup_confidence_nll(depth, conf, target, mask, tau=0.1, rho="l1")
    assert l1_loss.item() == pytest.approx(0.5 * 2.0 / 0.1 - math.log(0.5), rel=1e-5)


def test_sup_nll_only_counts_lidar_pixels() -> None:
    depth = _maps(2.0)
    target = torch.zeros_like(depth)
    target[0, 0, 1, 1] = 4.0  # one LiDAR pixel with log error log 2
    conf = _maps(1.0)
    mask = torch.ones_like(depth, dtype=torch.bool)
    loss = sup_confidence_nll(depth, conf, target, mask, tau=1.0)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-4)


def test_no_lidar_pixel_gives_zero_and_finite_gradient() -> None:
    depth = _maps(2.0).requires_grad_()
    conf = _maps(0.5).requires_grad_()
    loss = sup_confidence_nll(depth, conf, torch.zeros_like(depth), torch.ones_like(depth, dtype=torch.bool), 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(depth.grad).all() and torch.isfinite(conf.grad).all()


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_confidence_zero_or_one_is_finite(c: float) -> None:
    depth = _maps(2.0).requires_grad_()
    conf = _maps(c).requires_grad_()
    loss = sup_confidence_nll(depth, conf, _maps(3.0), torch.ones_like(depth, dtype=torch.bool), 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(depth.grad).all() and torch.isfinite(conf.grad).all()


def test_nan_and_inf_inputs_are_masked_out() -> None:
    depth = _maps(2.0)
    target = _maps(2.0)
    conf = _maps(1.0)
    depth[0, 0, 0, 0] = float("nan")
    depth[0, 0, 0, 1] = float("inf")
    depth[0, 0, 0, 2] = -1.0
    target[1, 0, 0, 0] = float("nan")
    target[1, 0, 0, 1] = float("inf")
    conf[1, 0, 2, 2] = float("nan")
    depth.requires_grad_()
    conf.requires_grad_()
    mask = torch.ones_like(target, dtype=torch.bool)
    loss = sup_confidence_nll(depth, conf, target, mask, 0.1)
    loss.backward()
    # every remaining pixel has zero error and C = 1 - eps: the loss is ~0, not NaN
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-4)
    assert torch.isfinite(depth.grad).all() and torch.isfinite(conf.grad).all()
    pf = point_filtering_held_out(depth, conf, target, mask, 0.1)
    assert torch.isfinite(pf)
    assert torch.isfinite(point_filtering_prior(conf, target, 0.2))


def test_fp32_under_bf16_autocast() -> None:
    depth = _maps(2.0).bfloat16()
    conf = _maps(0.3).bfloat16()
    target = _maps(3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sup_confidence_nll(depth, conf, target, torch.ones_like(target, dtype=torch.bool), 0.1)
        error = depth_error(depth, target)
    assert loss.dtype == torch.float32 and error.dtype == torch.float32
    expected = 0.3 * math.log(1.5) / 0.1 - math.log(0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-2)


def test_split_held_out_fraction_and_disjoint() -> None:
    torch.manual_seed(0)
    lidar = torch.rand(4, 1, 64, 64) < 0.3
    fit, held = split_held_out(lidar, 0.2)
    assert not (fit & held).any()
    assert torch.equal(fit | held, lidar)
    assert held.sum().item() / lidar.sum().item() == pytest.approx(0.2, abs=0.02)
    fit0, held0 = split_held_out(lidar, 0.0)
    assert torch.equal(fit0, lidar) and not held0.any()


def test_held_out_trains_confidence_only() -> None:
    depth = _maps(2.0).requires_grad_()
    conf = _maps(0.5).requires_grad_()
    target = _maps(4.0)
    held = torch.ones_like(target, dtype=torch.bool)
    loss = point_filtering("held_out", depth, conf, target, held, tau=0.1, fraction=0.2)
    loss.backward()
    assert depth.grad is None or not depth.grad.any()
    assert conf.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(0.5 * math.log(2.0) / 0.1 - math.log(0.5), rel=1e-5)


def test_prior_pulls_confidence_without_lidar_toward_m() -> None:
    conf = _maps(0.5)
    target = torch.zeros_like(conf)
    target[:, :, 0, :] = 5.0  # first row has LiDAR: excluded from the prior term
    conf[:, :, 0, :] = 0.9
    loss = point_filtering("prior", _maps(1.0), conf, target, torch.zeros_like(target, dtype=torch.bool), 0.1, 0.2)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    none = point_filtering("none", _maps(1.0), conf, target, torch.zeros_like(target, dtype=torch.bool), 0.1, 0.2)
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="loss.point_filtering"):
        point_filtering("bogus", _maps(1.0), conf, target, target > 0, 0.1, 0.2)  # type: ignore[arg-type]


def test_lidar_confidence_nll_trains_only_the_confidence_with_optional_median_scale() -> None:
    """U's depth at 2x the LiDAR: without alignment ρ = log 2; with it k = 1/2 and ρ = 0. Only the
    confidence gets a gradient; pixels and images without LiDAR do not count."""
    truth = _maps(5.0)
    sparse = torch.zeros_like(truth)
    sparse[0, :, ::2] = truth[0, :, ::2]  # image 1 has no LiDAR
    depth = (2.0 * truth).requires_grad_()
    conf = _maps(0.5).requires_grad_()
    raw = lidar_confidence_nll(depth, conf, sparse, tau=0.1)
    assert raw.item() == pytest.approx(0.5 * math.log(2.0) / 0.1 - math.log(0.5), rel=1e-5)
    aligned = lidar_confidence_nll(depth, conf, sparse, tau=0.1, align_scale=True)
    assert aligned.item() == pytest.approx(-math.log(0.5), rel=1e-5)
    (raw + aligned).backward()
    assert depth.grad is None or not depth.grad.any()
    assert conf.grad[0, :, ::2].abs().min() > 0
    assert not conf.grad[0, :, 1::2].any() and not conf.grad[1].any()
