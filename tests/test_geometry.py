"""Known-answer tests of distill_depth.geometry (pinhole model, warping, intrinsics, flips)."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic_scene import make_K, render_plane, rigid

from distill_depth.geometry import (
    GeometryError,
    backproject,
    crop_intrinsics,
    flip_intrinsics,
    flip_transform,
    pose_from_axis_angle,
    project,
    scale_intrinsics,
    transform_points,
    warp_to_target,
)

H, W = 48, 64


def _pixel_grid(batch: int, height: int, width: int) -> torch.Tensor:
    v, u = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    return torch.stack([u, v])[None].expand(batch, 2, height, width)


def test_backproject_project_round_trip() -> None:
    torch.manual_seed(0)
    K = make_K(2, H, W)
    depth = 1.0 + 20.0 * torch.rand(2, 1, H, W)
    points = backproject(depth, K)
    assert points.shape == (2, 3, H, W)
    torch.testing.assert_close(points[:, 2:], depth)
    torch.testing.assert_close(project(points, K), _pixel_grid(2, H, W), atol=1e-4, rtol=0)


def test_backproject_is_the_pinhole_inverse_at_a_known_pixel() -> None:
    K = make_K(1, H, W)
    depth = torch.full((1, 1, H, W), 4.0)
    fx, fy, cx, cy = K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], K[0, 1, 2]
    point = backproject(depth, K)[0, :, 10, 30]
    expected = torch.stack([(30 - cx) * 4 / fx, (10 - cy) * 4 / fy, torch.tensor(4.0)])
    torch.testing.assert_close(point, expected)


def test_pose_from_axis_angle_matches_rodrigues() -> None:
    angle = 0.3
    axis_angle = torch.tensor([[0.0, 0.0, angle]])
    T = pose_from_axis_angle(axis_angle, torch.tensor([[1.0, 2.0, 3.0]]))
    expected = torch.eye(4)
    expected[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    expected[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(T[0], expected)
    # transform_points applies R X + t
    X = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    moved = transform_points(X, T)[0, :, 0, 0]
    torch.testing.assert_close(moved, torch.tensor([1 + math.cos(angle), 2 + math.sin(angle), 3.0]))


@pytest.mark.parametrize("tx", [0.3, -0.5])
def test_known_translation_moves_a_fronto_parallel_plane_by_t_f_over_z(tx: float) -> None:
    K = make_K(1, H, W, focal=40.0)
    Z = 8.0
    depth = torch.full((1, 1, H, W), Z)
    T = pose_from_axis_angle(torch.zeros(1, 3), torch.tensor([[tx, 0.0, 0.0]]))
    pixels = project(transform_points(backproject(depth, K), T), K)
    shift = pixels - _pixel_grid(1, H, W)
    torch.testing.assert_close(shift[:, 0], torch.full((1, H, W), tx * 40.0 / Z), atol=1e-4, rtol=0)
    torch.testing.assert_close(shift[:, 1], torch.zeros(1, H, W), atol=1e-4, rtol=0)

    # the warped image is the source shifted by exactly tx·f/Z = 1.5 px (or -2.5 px)
    source = torch.rand(1, 1, H, W)
    warped, valid = warp_to_target(source, depth, T, K)
    s = tx * 40.0 / Z
    expected = torch.nn.functional.grid_sample(  # an independent sampler: plain torch
        source,
        torch.stack(
            [(_pixel_grid(1, H, W)[:, 0] + s) * 2 / (W - 1) - 1, _pixel_grid(1, H, W)[:, 1] * 2 / (H - 1) - 1], -1
        ),
        align_corners=True,
        padding_mode="border",
    )
    torch.testing.assert_close(warped, expected, atol=1e-5, rtol=0)
    # out of view exactly where x + s leaves [0, W-1]
    x = _pixel_grid(1, H, W)[:, :1] + s
    torch.testing.assert_close(valid, (x >= 0) & (x <= W - 1))


def test_warping_a_synthetic_scene_with_exact_depth_and_pose_reproduces_the_target() -> None:
    K = make_K(2, H, W)
    T_world_to_source = torch.stack(
        [rigid(0.02, -0.03, 0.01, 0.25, -0.05, 0.4), rigid(-0.01, 0.04, 0.0, -0.3, 0.02, -0.5)]
    )
    target, target_depth = render_plane(K, torch.eye(4), H, W)
    source, _ = render_plane(K, T_world_to_source, H, W)
    T_target_to_source = T_world_to_source.float()  # world = target camera

    warped, valid = warp_to_target(source, target_depth, T_target_to_source, K)
    error = (warped - target).abs().mean(1, keepdim=True)
    assert valid.float().mean() > 0.6  # the views overlap a lot...
    assert (~valid).any()  # ...but not completely: some pixels leave the source image
    assert error[valid].mean() < 3e-3, error[valid].mean()
    assert error[valid].max() < 3e-2
    # the check has teeth: a wrong pose gives a clearly larger error
    wrong, wrong_valid = warp_to_target(source, target_depth, torch.eye(4).repeat(2, 1, 1), K)
    assert (wrong - target).abs().mean(1, keepdim=True)[wrong_valid].mean() > 10 * error[valid].mean()


def test_points_behind_the_camera_are_invalid() -> None:
    K = make_K(1, H, W)
    depth = torch.full((1, 1, H, W), 2.0)
    T = pose_from_axis_angle(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -3.0]]))  # source 3 m in front
    _, valid = warp_to_target(torch.rand(1, 3, H, W), depth, T, K)
    assert not valid.any()


def test_flip_convention_warping_a_flipped_pair_gives_the_flipped_result() -> None:
    K = make_K(2, H, W)
    T = torch.stack([rigid(0.02, -0.05, 0.03, 0.3, -0.1, 0.4), rigid(0.0, 0.03, -0.02, -0.2, 0.05, -0.3)]).float()
    torch.manual_seed(0)
    source = torch.rand(2, 3, H, W)
    depth = 3.0 + 10 * torch.rand(2, 1, H, W)
    warped, valid = warp_to_target(source, depth, T, K)

    flip = lambda x: torch.flip(x, dims=[-1])  # noqa: E731
    warped_f, valid_f = warp_to_target(flip(source), flip(depth), flip_transform(T), flip_intrinsics(K, W))
    torch.testing.assert_close(warped_f, flip(warped), atol=1e-4, rtol=0)
    assert (valid_f != flip(valid)).float().mean() < 1e-3  # only float ties at the image border may differ

    # flip_transform is an involution and flip_intrinsics keeps fx positive
    torch.testing.assert_close(flip_transform(flip_transform(T)), T)
    assert (flip_intrinsics(K, W)[:, 0, 0] > 0).all()
    torch.testing.assert_close(flip_intrinsics(K, W)[:, 0, 2], (W - 1) - K[:, 0, 2])


def test_flip_convention_on_a_rendered_mirror_world() -> None:
    """Flipping an image of a scene equals rendering the mirrored scene with flipped K."""
    K = make_K(1, H, W)
    T_world_to_source = rigid(0.02, -0.03, 0.01, 0.25, -0.05, 0.4)[None]
    source, _ = render_plane(K, T_world_to_source, H, W)
    target, depth = render_plane(K, torch.eye(4), H, W)
    flip = lambda x: torch.flip(x, dims=[-1])  # noqa: E731
    warped, valid = warp_to_target(
        flip(source), flip(depth), flip_transform(T_world_to_source.float()), flip_intrinsics(K, W)
    )
    assert (warped - flip(target)).abs()[valid.expand_as(warped)].mean() < 3e-3


def test_intrinsics_under_resize_and_crop_follow_pixel_centres() -> None:
    K = make_K(1, H, W)
    # halving: pixel centres 0,1 -> 0.5·(c+0.5)-0.5, i.e. centre 0.5 of old pixels 0 and 1 maps to 0
    K2 = scale_intrinsics(K, 0.5, 0.5)
    torch.testing.assert_close(K2[0, 0, 2], (K[0, 0, 2] + 0.5) * 0.5 - 0.5)
    torch.testing.assert_close(K2[0, 0, 0], K[0, 0, 0] * 0.5)
    # a resize that is consistent with the renderer: render at half size == scaled K
    img_full, depth_full = render_plane(K, torch.eye(4), H, W)
    img_half, depth_half = render_plane(K2, torch.eye(4), H // 2, W // 2)
    pooled = torch.nn.functional.avg_pool2d(depth_full, 2)
    assert (pooled - depth_half).abs().max() < 0.02 * depth_half.max()  # area average ≈ centre value
    # crop: the crop's pixel (0,0) is the old pixel (x0,y0)
    Kc = crop_intrinsics(K, 5, 7)
    img_crop, depth_crop = render_plane(Kc, torch.eye(4), H - 7, W - 5)
    torch.testing.assert_close(img_crop, img_full[..., 7:, 5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(depth_crop, depth_full[..., 7:, 5:])
    # per-sample values
    Kb = scale_intrinsics(K.repeat(2, 1, 1), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(Kb[0], K[0])
    torch.testing.assert_close(Kb[1, 0, 0], 2 * K[0, 0, 0])


def test_gradients_reach_depth_pose_and_source() -> None:
    K = make_K(1, H, W)
    target, depth = render_plane(K, torch.eye(4), H, W)
    source, _ = render_plane(K, rigid(0.0, 0.02, 0.0, 0.2, 0.0, 0.1)[None], H, W)
    depth = depth.clone().requires_grad_(True)
    source = source.clone().requires_grad_(True)
    axis_angle = torch.tensor([[0.0, 0.02, 0.0]], requires_grad=True)
    translation = torch.tensor([[0.15, 0.0, 0.1]], requires_grad=True)
    warped, valid = warp_to_target(source, depth, pose_from_axis_angle(axis_angle, translation), K)
    loss = ((warped - target).abs() * valid).mean()
    loss.backward()
    named = {"depth": depth, "source": source, "axis_angle": axis_angle, "translation": translation}
    for name, tensor in named.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
        assert torch.isfinite(tensor.grad).all(), name


def test_fp32_under_autocast() -> None:
    K = make_K(1, H, W)
    source = torch.rand(1, 3, H, W).bfloat16()
    depth = torch.full((1, 1, H, W), 5.0).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped, valid = warp_to_target(source, depth, torch.eye(4)[None], K)
    assert warped.dtype == torch.float32 and valid.dtype == torch.bool
    torch.testing.assert_close(warped, source.float(), atol=1e-4, rtol=0)


def test_bad_shapes_raise_a_clear_error() -> None:
    with pytest.raises(GeometryError, match="K: expected shape"):
        backproject(torch.ones(1, 1, 4, 4), torch.eye(3))
    with pytest.raises(GeometryError, match="target_depth"):
        warp_to_target(torch.ones(1, 3, 4, 4), torch.ones(1, 1, 5, 4), torch.eye(4)[None], make_K(1, 4, 4))
