"""Photometric error, min-reprojection with auto-masking, L_self, smoothness: known answers."""

from __future__ import annotations

import math

import pytest
import torch

from distill_depth.geometry import warp_to_target
from distill_depth.losses import photometric, photometric_error, self_confidence_nll, smoothness


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed: int = 0, shape=(2, 3, 24, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def test_identical_images_have_zero_error() -> None:
    a = _image()
    assert photometric_error(a, a.clone()).abs().max().item() < 1e-5


def test_error_is_alpha_weighted_ssim_plus_l1() -> None:
    a = torch.full((1, 3, 8, 8), 0.2)
    b = torch.full((1, 3, 8, 8), 0.6)
    # constant images: SSIM = luminance term only = (2·.2·.6 + C1) / (.2² + .6² + C1)
    c1 = 0.01**2
    ssim = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    expected = 0.85 * (1 - ssim) / 2 + 0.15 * 0.4
    assert photometric_error(a, b).mean().item() == pytest.approx(expected, rel=1e-3)
    assert photometric_error(a, b, alpha=0.0).mean().item() == pytest.approx(0.4, rel=1e-5)


def test_min_over_sources_and_automask() -> None:
    target = _image(0)
    good = target.clone()
    bad = _image(1)
    far = _image(2)
    valid = torch.ones_like(target[:, :1], dtype=torch.bool)
    # the per-pixel min picks the perfectly matching warp
    pe_min, mask = photometric(target, [bad, good], [valid, valid], sources=[far], alpha=0.85)
    assert mask.all() and pe_min.abs().max().item() < 1e-5
    # auto-mask: the un-warped source already equals the target (static camera) -> pixel ignored
    pe_min, mask = photometric(target, [bad], [valid], sources=[target.clone()])
    assert not mask.any() and pe_min.abs().max().item() == 0.0
    # without auto-masking the same pixels count
    pe_min, mask = photometric(target, [bad], [valid], sources=None)
    assert mask.all() and pe_min.mean().item() > 0.1


def test_at_the_identity_pose_the_temporal_warp_still_teaches_the_pose() -> None:
    """The pose net starts at the identity motion exactly: there the warped temporal error ties the
    un-warped one up to the resampling's rounding (~1e-6). Auto-masking keeps the pixels where
    rounding puts the warp ahead (no margin), so the pose gets a gradient and can leave the
    identity. A margin of 1e-6 on the tie (tried 2026-12-07, with a fused warp since reverted)
    kept 4 % of those pixels, and in that run one of three held-out U-only seeds never learnt any
    motion (translation 0.003 m per frame, AbsRel 0.39 against 0.21)."""
    from distill_depth.geometry import pose_from_axis_angle

    target = _image(3, shape=(2, 3, 48, 160))
    source = _image(5, shape=(2, 3, 48, 160))
    K = torch.tensor([[90.0, 0.0, 80.0], [0.0, 90.0, 24.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    depth = 1.0 + 30.0 * _image(4, shape=(2, 1, 48, 160))
    translation = torch.zeros(2, 3, requires_grad=True)
    T = pose_from_axis_angle(torch.zeros(2, 3), translation)
    warped, valid = warp_to_target(source, depth, T, K)
    pe_min, mask = photometric(target, [warped], [valid], sources=[source])
    assert 0.25 < mask.float().mean() < 0.75  # rounding breaks the ties both ways (a 1e-6 margin kept 4 %)
    pe_min.sum().backward()
    assert translation.grad.abs().sum() > 0


def test_invalid_warp_is_used_only_without_alternative() -> None:
    target = _image(0)
    valid = torch.ones_like(target[:, :1], dtype=torch.bool)
    invalid = torch.zeros_like(valid)
    # the matching warp is out of view: the valid (worse) source is preferred
    pe_min, _ = photometric(target, [target.clone(), _image(1)], [invalid, valid], sources=None)
    assert pe_min.mean().item() > 0.1
    # no valid source at all: the border-padded error still counts and carries gradient
    warped = _image(1).requires_grad_()
    pe_min, mask = photometric(target, [warped], [invalid], sources=None)
    assert mask.all()
    pe_min.mean().backward()
    assert warped.grad.abs().sum() > 0


def test_exact_warp_of_translated_plane_gives_near_zero_loss() -> None:
    """A fronto-parallel textured plane, camera moved sideways: the true depth and pose explain the
    source, so the warped photometric error is ~0 where the warp stays in view."""
    B, H, W = 1, 32, 64
    K = torch.tensor([[[40.0, 0.0, (W - 1) / 2], [0.0, 40.0, (H - 1) / 2], [0.0, 0.0, 1.0]]])
    depth = torch.full((B, 1, H, W), 4.0)
    # source camera at x = +0.4 m: a plane point moves by fx·0.4/4 = 4 pixels to the left
    xs = torch.arange(W, dtype=torch.float32)
    pattern = lambda x: 0.5 + 0.3 * torch.sin(x / 2.0) * torch.ones(H, 1)  # noqa: E731
    target = pattern(xs).expand(3, H, W)[None]
    source = pattern(xs + 4.0).expand(3, H, W)[None]
    T = torch.eye(4)[None].clone()
    T[0, 0, 3] = -0.4
    warped, valid = warp_to_target(source, depth, T, K)
    pe_min, mask = photometric(target, [warped], [valid], sources=[source])
    inner = valid & mask
    inner[..., :6] = False  # SSIM window touches the border-padded columns next to the out-of-view ones
    inner[..., -3:] = False
    assert inner.float().mean() > 0.7
    assert pe_min[inner].max().item() < 1e-3


def test_self_confidence_nll_value_and_edge_cases() -> None:
    pe = torch.full((1, 1, 4, 4), 0.1)
    conf = torch.full((1, 1, 4, 4), 0.5)
    mask = torch.ones_like(pe, dtype=torch.bool)
    loss = self_confidence_nll(pe, conf, mask, tau=0.05)
    assert loss.item() == pytest.approx(0.5 * 0.1 / 0.05 - math.log(0.5), rel=1e-5)
    assert self_confidence_nll(pe, conf, torch.zeros_like(mask), 0.05).item() == 0.0
    for c in (0.0, 1.0, float("nan")):
        assert torch.isfinite(self_confidence_nll(pe, torch.full_like(pe, c), mask, 0.05))


def test_nan_inf_images_give_finite_values() -> None:
    a = _image()
    b = _image(1)
    a[0, 0, 3, 3] = float("nan")
    b[1, 2, 5, 5] = float("inf")
    valid = torch.ones_like(a[:, :1], dtype=torch.bool)
    pe_min, mask = photometric(a, [b], [valid], sources=[b])
    assert torch.isfinite(pe_min).all()
    assert not mask[0, 0, 3, 3] and not mask[1, 0, 5, 5]
    disp = torch.rand(2, 1, 24, 40)
    disp[0, 0, 0, 0] = float("nan")
    assert torch.isfinite(smoothness(disp, a))


def test_smoothness_known_answers() -> None:
    image = _image()
    flat = torch.full((2, 1, 24, 40), 0.3)
    assert smoothness(flat, image).item() == pytest.approx(0.0, abs=1e-7)
    ramp = torch.linspace(1.0, 2.0, 40).expand(2, 1, 24, 40).contiguous()
    # mean normalisation: scaling the disparity does not change the loss
    assert smoothness(3.0 * ramp, image).item() == pytest.approx(smoothness(ramp, image).item(), rel=1e-5)
    # edge-aware: a disparity step costs less where the image has an edge at the same place
    step = torch.ones(1, 1, 24, 40)
    step[..., 20:] = 2.0
    edge_image = torch.zeros(1, 3, 24, 40)
    edge_image[..., 20:] = 1.0
    assert smoothness(step, edge_image) < 0.5 * smoothness(step, torch.zeros(1, 3, 24, 40))


def test_fp32_under_bf16_autocast() -> None:
    a, b = _image().bfloat16(), _image(1).bfloat16()
    valid = torch.ones_like(a[:, :1], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pe_min, _ = photometric(a, [b], [valid], sources=[a])
        loss = self_confidence_nll(pe_min, torch.full_like(pe_min, 0.5).bfloat16(), valid, 0.05)
        smooth = smoothness(torch.rand(2, 1, 24, 40).bfloat16(), a)
    assert pe_min.dtype == loss.dtype == smooth.dtype == torch.float32
