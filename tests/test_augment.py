"""Known-answer tests of distill_depth.augment: inversion, sparse depth, intrinsics, parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from synthetic_scene import make_K, render_plane, rigid

from distill_depth.augment import AugmentError, build_augmenter
from distill_depth.config import AugmentConfig
from distill_depth.geometry import flip_intrinsics, flip_transform, warp_to_target
from distill_depth.types import Batch

H, W = 48, 64


def _batch(image: torch.Tensor, sources: dict | None = None, sparse: torch.Tensor | None = None,
           K: torch.Tensor | None = None, stereo_T: torch.Tensor | None = None) -> Batch:
    B = image.shape[0]
    return Batch(
        image=image,
        sources=sources if sources is not None else {"prev": image.flip(-2), "next": image.flip(-1)},
        sparse_depth=sparse if sparse is not None else torch.zeros(B, 1, H, W),
        K=K if K is not None else make_K(B, H, W),
        keys=[f"k{i}" for i in range(B)],
        stereo_T=stereo_T,
    )


def _coordinate_image(batch_size: int) -> torch.Tensor:
    """Channels u/(W-1), v/(H-1), 0.5: an image whose pixels name their own position."""
    v, u = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    image = torch.stack([u / (W - 1), v / (H - 1), torch.full_like(u, 0.5)])
    return image[None].repeat(batch_size, 1, 1, 1)


def _sparse(batch_size: int, density: float = 0.08) -> torch.Tensor:
    """Sparse depth with all-distinct values (so a value tells where it came from)."""
    torch.manual_seed(123)
    keep = torch.rand(batch_size, 1, H, W) < density
    values = torch.randperm(batch_size * H * W).float().reshape(batch_size, 1, H, W) * 1e-3 + 1.0
    return values * keep


def _augmenter(strength: str, **changes) -> torch.nn.Module:
    augmenter = build_augmenter(strength, dataclasses.replace(AugmentConfig(), **changes))
    return augmenter.train()


def test_weak_flip_is_inverted_exactly() -> None:
    torch.manual_seed(0)
    image = torch.rand(6, 3, H, W)
    sparse = _sparse(6)
    view = _augmenter("weak")(_batch(image, sparse=sparse))
    flipped = view.flipped
    assert 0 < flipped.sum() < 6  # the seed gives both kinds
    # clean images are the exact mirror (flip only), the network image is jittered
    assert torch.equal(view.clean_image[flipped], image[flipped].flip(-1))
    assert torch.equal(view.clean_image[~flipped], image[~flipped])
    assert (view.image - view.clean_image).abs().mean() > 1e-3
    restored, valid = view.to_canonical(view.clean_image)
    assert torch.equal(restored, image) and valid.all()
    # half resolution: a mirror at any scale
    low = torch.nn.functional.avg_pool2d(view.clean_image, 2)
    restored_low, _ = view.to_canonical(low)
    # (equal up to the summation order of the 2×2 average)
    torch.testing.assert_close(restored_low, torch.nn.functional.avg_pool2d(image, 2), atol=1e-6, rtol=0)
    # sparse depth: mirrored exactly, K with cx' = W-1-cx on flipped samples only
    assert torch.equal(view.sparse_depth, torch.where(flipped.view(-1, 1, 1, 1), sparse.flip(-1), sparse))
    torch.testing.assert_close(view.K, flip_intrinsics(make_K(6, H, W), W, flipped))


def test_crop_rotation_inverse_restores_alignment_within_a_pixel() -> None:
    torch.manual_seed(1)
    image = _coordinate_image(8)
    view = _augmenter("strong", crop_scale=(0.5, 0.9), rotation_deg=5.0)(_batch(image))
    assert view.K is None  # a rotation makes K invalid
    restored, valid = view.to_canonical(view.clean_image)
    err_px = torch.stack([(restored[:, 0] - image[:, 0]) * (W - 1), (restored[:, 1] - image[:, 1]) * (H - 1)])
    err_px = err_px.abs().amax(0)[valid[:, 0]]
    assert err_px.median() < 1e-3  # bilinear resampling of an affine function is exact...
    assert (err_px < 1.0).float().mean() > 0.99  # ...except where zero padding touches the crop edge
    # pixels outside the crop are invalid: the valid fraction is about the crop's area
    area = view.params["crop_scale"]
    torch.testing.assert_close(valid.float().mean((1, 2, 3)), area, atol=0.06, rtol=0)


def test_crop_content_is_the_analytic_box_and_half_resolution_maps_invert() -> None:
    torch.manual_seed(2)
    image = _coordinate_image(4)
    view = _augmenter("strong", crop_scale=(0.5, 0.9), rotation_deg=0.0, flip_p=0.0)(_batch(image))
    side = view.params["crop_scale"].sqrt()
    q = torch.arange(W).float()
    # aug pixel centre q shows canonical x = left + (q + 0.5)·side − 0.5
    expected_u = view.params["crop_left"][:, None] + (q[None] + 0.5) * side[:, None] - 0.5
    torch.testing.assert_close(view.clean_image[:, 0, H // 2] * (W - 1), expected_u, atol=1e-3, rtol=0)
    # a half-resolution prediction maps back to the half-resolution canonical grid
    low = torch.nn.functional.interpolate(view.clean_image, scale_factor=0.5, mode="bilinear", align_corners=False)
    restored, valid = view.to_canonical(low)
    low_canonical = torch.nn.functional.interpolate(image, scale_factor=0.5, mode="bilinear", align_corners=False)
    err_px = ((restored - low_canonical)[:, 0] * (W - 1)).abs()[valid[:, 0]]
    assert err_px.median() < 0.05 and (err_px < 1.0).float().mean() > 0.98


def test_sparse_depth_is_moved_never_interpolated() -> None:
    torch.manual_seed(3)
    sparse = _sparse(4)
    image = _coordinate_image(4)
    view = _augmenter("strong", crop_scale=(0.6, 0.9), rotation_deg=5.0, zoom_depth="keep")(_batch(image, sparse=sparse))
    moved = view.sparse_depth
    values = moved[moved > 0]
    assert values.numel() > 0.4 * (sparse > 0).sum()
    assert torch.isin(values, sparse[sparse > 0]).all()  # a subset of the original values
    # each value lands where the transform sends its pixel (rounded), nearest wins on collision
    expected = {}
    for b, _, v, u in torch.nonzero(sparse > 0).tolist():
        q = view.canonical_to_aug[b] @ torch.tensor([float(u), float(v), 1.0])
        qu, qv = round(q[0].item()), round(q[1].item())
        if 0 <= qu < W and 0 <= qv < H:
            d = sparse[b, 0, v, u].item()
            expected[(b, qv, qu)] = min(d, expected.get((b, qv, qu), float("inf")))
    got = {(b, v, u): moved[b, 0, v, u].item() for b, _, v, u in torch.nonzero(moved > 0).tolist()}
    assert got == pytest.approx(expected)
    # and that location agrees with the image geometry: the moved point's pixel shows its source position
    for (b, v, u), d in list(got.items())[:200]:
        (ov, ou) = [(vv, uu) for _, _, vv, uu in torch.nonzero(sparse[b : b + 1] == d).tolist()][0]
        shown = view.clean_image[b, :2, v, u] * torch.tensor([W - 1, H - 1])
        assert (shown - torch.tensor([ou, ov])).abs().max() <= 0.75  # rounding ≤ 0.5 px per axis, ×1/side


def test_zoom_divides_lidar_depth_by_the_magnification() -> None:
    """``zoom_depth: scale``: the same pixels as ``keep``, values divided by m = 1/sqrt(area), and
    the view carries m back (a flip-only view carries nothing)."""
    sparse, image = _sparse(4), _coordinate_image(4)
    views = {}
    for mode in ("keep", "scale"):
        torch.manual_seed(5)
        views[mode] = _augmenter("strong", crop_scale=(0.6, 0.9), rotation_deg=3.0, zoom_depth=mode)(
            _batch(image, sparse=sparse))
    keep, scale = views["keep"], views["scale"]
    assert keep.depth_to_canonical is None
    m = scale.depth_to_canonical
    assert torch.allclose(m, scale.params["crop_scale"].rsqrt()) and (m > 1.05).all() and (m < 1.3).all()
    assert torch.equal(scale.sparse_depth > 0, keep.sparse_depth > 0)
    assert torch.allclose(scale.sparse_depth * m.view(-1, 1, 1, 1), keep.sparse_depth, rtol=1e-6)
    assert _augmenter("strong", crop_scale=(1.0, 1.0), rotation_deg=3.0)(_batch(image, sparse=sparse)).depth_to_canonical is None
    assert _augmenter("weak")(_batch(image, sparse=sparse)).depth_to_canonical is None
    with pytest.raises(AugmentError, match="zoom_depth"):
        _augmenter("strong", zoom_depth="stretch")


def _scene_batch(batch_size: int) -> tuple[Batch, torch.Tensor]:
    K = make_K(batch_size, H, W)
    poses = [rigid(0.02, -0.03, 0.01, 0.25, -0.05, 0.4), rigid(-0.01, 0.03, 0.0, -0.3, 0.02, -0.3)]
    T = torch.stack([poses[i % 2] for i in range(batch_size)])
    target, depth = render_plane(K, torch.eye(4), H, W)
    source, _ = render_plane(K, T, H, W)
    return _batch(target, sources={"stereo": source}, sparse=depth, K=K, stereo_T=T.float()), depth


def test_weak_augmentation_keeps_warping_exact_on_a_synthetic_scene() -> None:
    torch.manual_seed(4)
    batch, _ = _scene_batch(4)
    view = _augmenter("weak")(batch)
    assert 0 < view.flipped.sum() < 4
    torch.testing.assert_close(view.stereo_T, flip_transform(batch.stereo_T, view.flipped))
    # weak augmentation flips exactly, so the dense depth stays dense
    warped, valid = warp_to_target(view.clean_sources["stereo"], view.sparse_depth, view.stereo_T, view.K)
    error = (warped - view.clean_image).abs().mean(1, keepdim=True)[valid]
    assert valid.float().mean() > 0.6 and error.mean() < 3e-3, error.mean()
    # the jittered images would not match: the photometric loss must use the clean ones
    assert (view.image - view.clean_image).abs().mean() > 5 * error.mean()


def test_crop_scale_augmentation_keeps_intrinsics_consistent_on_a_synthetic_scene() -> None:
    torch.manual_seed(5)
    batch, depth = _scene_batch(4)
    # keep: the view is a photo taken with the augmented K, depth unchanged (what U's warping needs)
    view = _augmenter("strong", crop_scale=(0.5, 0.8), rotation_deg=0.0, zoom_depth="keep")(batch)
    assert view.K is not None and 0 < view.flipped.sum() < 4
    # the augmented image IS a photo of the (mirrored) scene taken with the augmented K
    rendered, rendered_depth = render_plane(view.K, torch.eye(4), H, W, mirror=view.flipped.cpu())
    assert (rendered - view.clean_image).abs().mean() < 3e-3
    # warping with that depth, the augmented K and the flip-adjusted pose reproduces the target
    warped, valid = warp_to_target(view.clean_sources["stereo"], rendered_depth, view.stereo_T, view.K)
    error = (warped - view.clean_image).abs().mean(1, keepdim=True)[valid]
    assert valid.float().mean() > 0.5 and error.mean() < 3e-3, error.mean()
    # the moved depth values agree with the rendered depth where they land (within the sub-pixel rounding)
    hit = view.sparse_depth > 0
    assert hit.float().mean() > 0.3  # a zoom spreads the dense input: holes, not interpolation
    rel = ((view.sparse_depth - rendered_depth).abs() / rendered_depth)[hit]
    assert rel.max() < 0.01
    assert torch.isin(view.sparse_depth[hit], depth).all()
    # scale: the same photo, LiDAR D*/m; D*/m · m is the depth the augmented K warps with (branch U)
    torch.manual_seed(5)
    scaled = _augmenter("strong", crop_scale=(0.5, 0.8), rotation_deg=0.0)(batch)
    m = scaled.depth_to_canonical.view(-1, 1, 1, 1)
    assert torch.allclose(scaled.K, view.K) and torch.equal(scaled.clean_image, view.clean_image)
    rel = ((scaled.sparse_depth * m - rendered_depth).abs() / rendered_depth)[hit]
    assert rel.max() < 0.01 and (scaled.sparse_depth[hit] < 0.95 * rendered_depth[hit]).all()


def test_same_parameters_for_target_and_sources_but_per_sample() -> None:
    torch.manual_seed(6)
    one = torch.rand(1, 3, H, W)
    image = one.repeat(4, 1, 1, 1)
    for strength in ("weak", "strong"):
        view = _augmenter(strength)(_batch(image, sources={"prev": image.clone(), "next": image.clone()}))
        for name in ("prev", "next"):
            assert torch.equal(view.sources[name], view.image), (strength, name)
            assert torch.equal(view.clean_sources[name], view.clean_image), (strength, name)
        # identical samples get different (per-sample) parameters
        assert (view.image[0] - view.image[1:]).abs().amax((1, 2, 3)).min() > 1e-3, strength


def test_global_rng_makes_augmentation_repeatable() -> None:
    image = torch.rand(3, 3, H, W)
    augmenter = _augmenter("strong")
    torch.manual_seed(7)
    first = augmenter(_batch(image))
    torch.manual_seed(7)
    again = augmenter(_batch(image))
    torch.manual_seed(8)
    other = augmenter(_batch(image))
    assert torch.equal(first.image, again.image) and torch.equal(first.canonical_to_aug, again.canonical_to_aug)
    assert not torch.equal(first.image, other.image)


def test_eval_mode_is_the_identity_view() -> None:
    image = torch.rand(2, 3, H, W)
    sparse = _sparse(2)
    batch = _batch(image, sparse=sparse, stereo_T=torch.eye(4).repeat(2, 1, 1))
    for strength in ("weak", "strong"):
        view = _augmenter(strength).eval()(batch)
        assert view.image is image and view.clean_image is image and view.sparse_depth is sparse
        assert view.K is batch.K and view.stereo_T is batch.stereo_T
        maps = torch.rand(2, 1, H // 2, W // 2)
        restored, valid = view.to_canonical(maps)
        assert torch.equal(restored, maps) and valid.all()


def test_to_canonical_is_differentiable_and_fp32_under_autocast() -> None:
    torch.manual_seed(9)
    view = _augmenter("strong")(_batch(torch.rand(2, 3, H, W)))
    maps = torch.rand(2, 1, H, W, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        restored, valid = view.to_canonical(maps.bfloat16())
    assert restored.dtype == torch.float32
    (restored * valid).sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_augmenter_has_no_state_and_rejects_bad_settings() -> None:
    assert _augmenter("strong").state_dict() == {}
    with pytest.raises(AugmentError, match="crop_scale"):
        build_augmenter("strong", dataclasses.replace(AugmentConfig(), crop_scale=(0.0, 1.0)))
    with pytest.raises(AugmentError, match="strength"):
        build_augmenter("medium", AugmentConfig())  # type: ignore[arg-type]


def _synth_drive(tmp_path) -> tuple[Batch, torch.Tensor]:
    """Frame 0 of a tiny drive from ``distill-depth synth``: target, next frame, stereo, exact poses."""
    synth = pytest.importorskip("distill_depth.data.synth")
    import numpy as np
    from PIL import Image

    from distill_depth.data.kitti import read_depth_png

    drive = synth.generate(tmp_path, drives=1, frames=2, seed=0, height=64, width=208, azimuth_steps=128)[0]
    calib = (drive.parent / "calib_cam_to_cam.txt").read_text().splitlines()
    P = np.array(next(line for line in calib if line.startswith("P_rect_02:")).split(":")[1].split(), float)
    K = P.reshape(3, 4)[:, :3].copy()
    K[:2, 2] -= 1.0  # KITTI files are 1-based; ours is 0-based pixel centres
    P3 = np.array(next(line for line in calib if line.startswith("P_rect_03:")).split(":")[1].split(), float)
    baseline = -P3.reshape(3, 4)[0, 3] / P3.reshape(3, 4)[0, 0]  # P_rect_03 = K [I | (-b, 0, 0)]

    def image(camera: int, frame: int) -> torch.Tensor:
        pixels = np.asarray(Image.open(drive / f"image_0{camera}" / "data" / f"{frame:010d}.png"), np.float32)
        return torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None]

    poses = synth.read_poses(drive / "poses.txt")  # camera 2 → world
    T_next = torch.from_numpy(np.linalg.inv(poses[1]) @ poses[0]).float()[None]
    T_stereo = torch.eye(4)[None]
    T_stereo[0, 0, 3] = -baseline
    depth = torch.from_numpy(read_depth_png(drive / "proj_depth" / "groundtruth" / "image_02" / f"{0:010d}.png"))
    batch = _batch(image(2, 0), sources={"next": image(2, 1), "stereo": image(3, 0)}, sparse=depth[None, None],
                   K=torch.from_numpy(K).float()[None], stereo_T=T_stereo)
    return batch, T_next


def test_weak_augmentation_on_a_synth_drive_keeps_photometric_consistency(tmp_path) -> None:
    batch, T_next = _synth_drive(tmp_path)
    W_ = batch.image.shape[-1]

    def median_error(view, source: str, T: torch.Tensor) -> tuple[float, float]:
        warped, valid = warp_to_target(view.clean_sources[source], view.sparse_depth, T, view.K)
        mask = valid & (view.sparse_depth > 0)
        assert mask.float().mean() > 0.5
        error = (warped - view.clean_image).abs().mean(1, keepdim=True)[mask]
        return error.median().item(), error.mean().item()

    plain = _augmenter("weak").eval()(batch)
    identity_error = median_error(plain, "next", torch.eye(4)[None])
    torch.manual_seed(0)
    flipped = _augmenter("weak", flip_p=1.0)(batch)
    assert flipped.flipped.all() and flipped.K[0, 0, 2] == (W_ - 1) - batch.K[0, 0, 2]
    for view, T_next_view in ((plain, T_next), (flipped, flip_transform(T_next))):
        for source, T in (("next", T_next_view), ("stereo", view.stereo_T)):
            median, mean = median_error(view, source, T)
            # ground-truth depth + exact pose: small residual (occlusions, aliasing, 8-bit PNGs),
            # far below what an unwarped frame gives
            assert median < 0.015 and mean < 0.3 * identity_error[1], (source, median, mean, identity_error)
