"""Synthetic KITTI generator: layout, determinism, calibration, LiDAR ↔ dense depth, photometric consistency.

Everything is read back through the project's own KITTI reader (``distill_depth.data.kitti``), so
these tests also show that a synthetic tree is a valid KITTI raw tree for the rest of the pipeline.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_depth import geometry
from distill_depth.cli import main as cli_main
from distill_depth.data import kitti
from distill_depth.data import synth_scene as sc
from distill_depth.data.synth import date_for_seed, drive_name, generate, read_poses
from distill_depth.data.synth_calib import STEREO_BASELINE, VELO_HEIGHT, Rig, SynthError
from distill_depth.data.synth_sensors import (
    LIDAR_MAX_RANGE,
    camera_regions,
    lidar_directions,
    lidar_regions,
    render_camera,
)

HEIGHT, WIDTH, FRAMES, SEED = 96, 320, 4, 7


@pytest.fixture(scope="module")
def drive(module_tmp_path: Path) -> Path:
    out = module_tmp_path / "synth"
    (drive_dir,) = generate(out, drives=1, frames=FRAMES, seed=SEED, height=HEIGHT, width=WIDTH)
    return drive_dir


def _image(drive_dir: Path, camera: int, frame: int) -> torch.Tensor:
    array = np.asarray(kitti.read_image(drive_dir / f"image_0{camera}" / "data" / f"{frame:010d}.png"))
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _depth(drive_dir: Path, camera: int, frame: int) -> torch.Tensor:
    path = kitti.groundtruth_path(drive_dir.parent, drive_dir.name, camera, frame)
    return torch.from_numpy(kitti.read_depth_png(path))[None, None]


def _tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_layout(drive: Path) -> None:
    date = date_for_seed(SEED)
    assert drive.name == drive_name(date, 1) == f"{date}_drive_0001_sync"
    assert (drive.parent / "calib_cam_to_cam.txt").is_file() and (drive.parent / "calib_velo_to_cam.txt").is_file()
    names = [f"{frame:010d}" for frame in range(FRAMES)]
    for sub in ("image_02/data", "image_03/data", "proj_depth/groundtruth/image_02",
                "proj_depth/groundtruth/image_03"):
        assert sorted(p.stem for p in (drive / sub).glob("*.png")) == names, sub
    assert sorted(p.stem for p in (drive / "velodyne_points/data").glob("*.bin")) == names
    with Image.open(drive / "image_02/data/0000000000.png") as image:
        assert (image.mode, image.size) == ("RGB", (WIDTH, HEIGHT))
    with Image.open(drive / "proj_depth/groundtruth/image_02/0000000000.png") as depth_png:
        assert depth_png.size == (WIDTH, HEIGHT) and np.asarray(depth_png).dtype == np.uint16
    depth = _depth(drive, 2, 0)
    assert 0.02 < (depth == 0).float().mean() < 0.5  # some sky, mostly surfaces
    assert depth[depth > 0].min() > 1.0 and depth.max() < 256.0
    poses = read_poses(drive / "poses.txt")
    assert poses.shape == (FRAMES, 4, 4)
    np.testing.assert_allclose(poses[0], np.eye(4), atol=1e-9)
    # Driving forward (camera z) at 0.7–1.2 m per frame with rotations of a few degrees at most.
    steps = np.linalg.inv(poses[:-1]) @ poses[1:]
    assert np.all((steps[:, 2, 3] > 0.6) & (steps[:, 2, 3] < 1.3))
    assert np.all(np.abs(steps[:, 0, 3]) < 0.1)
    angles = np.degrees(np.arccos(np.clip((np.trace(steps[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.all(angles < 3.0)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    options = dict(drives=2, frames=2, height=32, width=96, azimuth_steps=400)
    generate(tmp_path / "a", seed=3, **options)
    generate(tmp_path / "b", seed=3, workers=2, **options)  # worker processes give the same bytes
    generate(tmp_path / "c", seed=4, **options)
    first, second = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(first) == 2 + 2 * (2 * 5 + 1) and first == second
    other = _tree_digest(tmp_path / "c")
    assert set(other).isdisjoint(first)  # another seed is another date folder ...
    image = "2000_01_04/2000_01_04_drive_0001_sync/image_02/data/0000000000.png"
    assert other[image.replace("01_04", "01_05")] != first[image]  # ... and another scene


def test_calibration_parses_with_the_project_reader(drive: Path) -> None:
    calib = kitti.load_calibration(drive.parent)
    assert calib.image_size[2] == calib.image_size[3] == (HEIGHT, WIDTH)
    K = kitti.intrinsics(calib, 2, (HEIGHT, WIDTH), (HEIGHT, WIDTH))
    np.testing.assert_allclose(K, Rig(HEIGHT, WIDTH).K, atol=1e-9)
    assert kitti.stereo_baseline(calib) == pytest.approx(STEREO_BASELINE, abs=1e-9)
    assert STEREO_BASELINE == pytest.approx(0.54)
    # Camera 3 sits to the right of camera 2: a point seen by camera 2 is 0.54 m further left in camera 3.
    assert kitti.stereo_transform(calib, 2, 3)[0, 3] == pytest.approx(-0.54)
    velo_to_rect = calib.velo_to_rect()
    forward = velo_to_rect[:3, :3] @ np.array([1.0, 0.0, 0.0])
    assert forward[2] > 0.999  # Velodyne x → camera z
    camera_centre_in_velo = np.linalg.inv(velo_to_rect)[:3, 3]
    assert camera_centre_in_velo[2] == pytest.approx(-0.08, abs=1e-6)  # camera 1.65 m above the road
    assert not np.allclose(calib.rect_00, np.eye(4))  # a real rectifying rotation: forgetting it shows


def _project_exact(points: np.ndarray, calib: kitti.DriveCalibration) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-pixel 0-based (u, v) and depth of Velodyne points in camera 2 (points ahead and inside)."""
    velo = points[points[:, 0] >= 0].astype(np.float64)
    homogeneous = np.c_[velo[:, :3], np.ones(len(velo))]
    image_points = homogeneous @ (calib.P_rect[2] @ calib.velo_to_rect()).T
    z = image_points[:, 2]
    u, v = image_points[:, 0] / z - 1.0, image_points[:, 1] / z - 1.0
    inside = (z > 0) & (u >= 0) & (v >= 0) & (u <= WIDTH - 1) & (v <= HEIGHT - 1)
    return u[inside], v[inside], z[inside]


def _interpolate_inverse_depth(depth: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Depth at sub-pixel (u, v) by bilinear interpolation of 1/depth (exact on a plane)."""
    inverse = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-9), np.nan)
    u0 = np.minimum(np.floor(u).astype(int), depth.shape[1] - 2)
    v0 = np.minimum(np.floor(v).astype(int), depth.shape[0] - 2)
    a, b = u - u0, v - v0
    value = (inverse[v0, u0] * (1 - a) * (1 - b) + inverse[v0, u0 + 1] * a * (1 - b)
             + inverse[v0 + 1, u0] * (1 - a) * b + inverse[v0 + 1, u0 + 1] * a * b)
    return 1.0 / value


def test_lidar_scan_looks_like_a_hdl64(drive: Path) -> None:
    points = kitti.load_velodyne(drive / "velodyne_points/data/0000000001.bin").astype(np.float64)
    assert len(points) > 60_000  # 64 beams × 2000 firings, minus sky
    distance = np.linalg.norm(points[:, :3], axis=1)
    assert distance.max() <= LIDAR_MAX_RANGE + 1e-3
    elevation = np.degrees(np.arcsin(points[:, 2] / distance))
    assert elevation.min() > -24.8 - 1e-3 and elevation.max() < 2.0 + 1e-3
    spacing = (2.0 + 24.8) / 63
    beam = np.round((2.0 - elevation) / spacing)
    assert len(np.unique(beam)) == 64 and np.abs(2.0 - beam * spacing - elevation).max() < 0.01
    assert np.all((points[:, 3] >= 0) & (points[:, 3] <= 1))
    assert (points[:, 0] < 0).mean() > 0.2  # a full 360° sweep, behind the car too
    # The steepest beams mostly hit the road ~5 m around the car (some hit parked cars beside it).
    steep = points[elevation < -20]
    assert np.mean(np.abs(steep[:, 2] + VELO_HEIGHT) < 0.05) > 0.7


def test_fewer_beams_give_a_sparser_scan_of_the_same_scene(drive: Path, tmp_path: Path) -> None:
    """``--beams 16``: the same street, cameras and poses; 16 evenly spread elevations over the same
    field of view, so about a quarter of the points."""
    (sparse_drive,) = generate(tmp_path, drives=1, frames=FRAMES, seed=SEED, height=HEIGHT, width=WIDTH, beams=16)
    name = "0000000001"
    assert (sparse_drive / "image_02/data" / f"{name}.png").read_bytes() == (drive / "image_02/data" / f"{name}.png").read_bytes()
    dense = kitti.load_velodyne(drive / "velodyne_points/data" / f"{name}.bin").astype(np.float64)
    sparse = kitti.load_velodyne(sparse_drive / "velodyne_points/data" / f"{name}.bin").astype(np.float64)
    elevation = np.degrees(np.arcsin(sparse[:, 2] / np.linalg.norm(sparse[:, :3], axis=1)))
    spacing = (2.0 + 24.8) / 15
    beam = np.round((2.0 - elevation) / spacing)
    assert len(np.unique(beam)) == 16 and np.abs(2.0 - beam * spacing - elevation).max() < 0.01
    assert 0.15 < len(sparse) / len(dense) < 0.35
    # The region culling stays exact for another beam count.
    scene = sc.build_scene(np.random.default_rng([SEED, 1]), -120.0, 300.0)
    pose = np.eye(4)
    pose[2, 3] = VELO_HEIGHT
    beams = lidar_directions(360, 16)
    culled = sc.cast(scene, pose[:3, 3], beams, lidar_regions(scene, pose, 360, LIDAR_MAX_RANGE, 16), LIDAR_MAX_RANGE)
    full = sc.cast(scene, pose[:3, 3], beams, [(b, slice(0, 16), slice(0, 360)) for b in range(len(scene.kind))],
                   LIDAR_MAX_RANGE)
    np.testing.assert_array_equal(culled[0], full[0])
    with pytest.raises(SynthError, match="--beams"):
        generate(tmp_path / "y", beams=0)


@pytest.mark.parametrize("frame", [0, FRAMES - 1])
def test_lidar_projection_lands_on_the_dense_ground_truth(drive: Path, frame: int) -> None:
    calib = kitti.load_calibration(drive.parent)
    points = kitti.load_velodyne(drive / "velodyne_points/data" / f"{frame:010d}.bin")
    gt = kitti.read_depth_png(kitti.groundtruth_path(drive.parent, drive.name, 2, frame)).astype(np.float64)

    # 1. The standard (Eigen) projection with pixel = round(u) - 1: every LiDAR pixel has a ground
    #    truth, equal up to how much the surface's depth changes within half a pixel.
    sparse = kitti.project_velodyne(points, calib, 2, (HEIGHT, WIDTH))
    hit = sparse > 0
    assert hit.sum() > 5000 and np.all(gt[hit] > 0)
    padded = np.pad(gt, 1, mode="edge")
    neighbours = np.stack([padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]])
    half_pixel_change = 0.5 * np.abs(neighbours - gt).max(axis=0)
    error = np.abs(sparse - gt)
    assert np.mean(error[hit] <= 0.01 + half_pixel_change[hit]) > 0.97
    fronto_parallel = hit & (half_pixel_change < 0.005)  # e.g. the backs of cars, façades seen head on
    assert np.mean(error[fronto_parallel] < 0.01) > 0.97

    # 2. At the exact sub-pixel position the depth agrees within 1 cm: 1/depth is affine in the
    #    pixel coordinates on a plane, so interpolating it from the 4 nearest pixel centres is exact
    #    wherever those lie on the point's plane. Exceptions: depth edges and creases (road/wall).
    u, v, z = _project_exact(points, calib)
    error = np.abs(_interpolate_inverse_depth(gt, u, v) - z)
    assert np.nanmedian(error) < 0.003
    assert np.mean(error < 0.01) > 0.88
    second_difference = np.zeros_like(gt)
    inverse = np.where(gt > 0, 1.0 / np.maximum(gt, 1e-9), 0.0)
    second_difference[1:-1, 1:-1] = np.maximum(
        np.abs(inverse[1:-1, 2:] + inverse[1:-1, :-2] - 2 * inverse[1:-1, 1:-1]),
        np.abs(inverse[2:, 1:-1] + inverse[:-2, 1:-1] - 2 * inverse[1:-1, 1:-1]),
    )
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    u1, v1 = np.minimum(u0 + 1, WIDTH - 1), np.minimum(v0 + 1, HEIGHT - 1)
    crease = np.maximum.reduce([second_difference[v0, u0], second_difference[v0, u1], second_difference[v1, u0],
                                second_difference[v1, u1]]) * z * z
    planar = crease < 0.005
    assert planar.mean() > 0.5
    assert np.mean(error[planar] < 0.01) > 0.995

    # 3. The test can tell: one pixel off (round(u) instead of round(u) - 1) breaks the agreement.
    shifted = np.abs(_interpolate_inverse_depth(gt, u + 1, v + 1) - z)
    assert np.mean(shifted < 0.01) < 0.5


def _visible(target_depth: torch.Tensor, source_depth: torch.Tensor, T: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Target pixels whose surface point is seen by the source view too (no occlusion, in view)."""
    z_in_source = geometry.transform_points(geometry.backproject(target_depth, K), T)[:, 2:3]
    source_depth_there, valid = geometry.warp_to_target(source_depth, target_depth, T, K)
    return valid & (target_depth > 0) & ((source_depth_there - z_in_source).abs() < 0.02 * z_in_source)


def test_photometric_consistency_with_the_true_depth_and_pose(drive: Path) -> None:
    calib = kitti.load_calibration(drive.parent)
    K = torch.from_numpy(kitti.intrinsics(calib, 2, (HEIGHT, WIDTH), (HEIGHT, WIDTH))).float()[None]
    poses = read_poses(drive / "poses.txt")
    for t in range(FRAMES - 1):
        target, source = _image(drive, 2, t), _image(drive, 2, t + 1)
        target_depth = _depth(drive, 2, t)
        T = torch.from_numpy(np.linalg.inv(poses[t + 1]) @ poses[t]).float()[None]  # target → source
        warped, _ = geometry.warp_to_target(source, target_depth, T, K)
        visible = _visible(target_depth, _depth(drive, 2, t + 1), T, K)
        assert visible.float().mean() > 0.5
        error = (warped - target).abs().mean(1, keepdim=True)[visible]
        unwarped = (source - target).abs().mean(1, keepdim=True)[visible]
        assert error.mean() < 0.025 and error.median() < 0.012, (t, error.mean(), error.median())
        assert error.mean() < 0.25 * unwarped.mean()
        # A pose that ignores the ~1 m of forward motion does much worse.
        still = T.clone()
        still[:, :3, 3] = 0
        wrong, _ = geometry.warp_to_target(source, target_depth, still, K)
        assert (wrong - target).abs().mean(1, keepdim=True)[visible].mean() > 3 * error.mean()

    # Stereo: the right image warped into the left with the calibration's transform.
    T_stereo = torch.from_numpy(kitti.stereo_transform(calib, 2, 3)).float()[None]
    target_depth = _depth(drive, 2, 0)
    warped, _ = geometry.warp_to_target(_image(drive, 3, 0), target_depth, T_stereo, K)
    visible = _visible(target_depth, _depth(drive, 3, 0), T_stereo, K)
    error = (warped - _image(drive, 2, 0)).abs().mean(1, keepdim=True)[visible]
    assert visible.float().mean() > 0.6 and error.mean() < 0.025 and error.median() < 0.012


def test_region_culling_is_exact() -> None:
    """Casting only each box's projected rectangle gives the same hits as testing every ray."""
    rng = np.random.default_rng(5)
    velo_poses = sc.trajectory(rng, 3)
    scene = sc.build_scene(rng, -120.0, 300.0)
    rig = Rig(48, 160)

    def every_box(rows: int, cols: int) -> list[tuple[int, slice, slice]]:
        return [(box, slice(0, rows), slice(0, cols)) for box in range(len(scene.kind))]

    for pose in velo_poses:
        T_scene_cam = pose @ rig.T_velo_from_camera(2)
        cols, rows = np.meshgrid(np.arange(160.0), np.arange(48.0))
        K = rig.K
        rays = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones_like(cols)], axis=-1)
        directions = rays @ T_scene_cam[:3, :3].T
        origin = T_scene_cam[:3, 3]
        culled = sc.cast(scene, origin, directions, camera_regions(scene, T_scene_cam, K, 48, 160, 250.0), 250.0)
        full = sc.cast(scene, origin, directions, every_box(48, 160), 250.0)
        np.testing.assert_array_equal(culled[1], full[1])
        np.testing.assert_array_equal(culled[0], full[0])
        beams = lidar_directions(360) @ pose[:3, :3].T
        culled = sc.cast(scene, pose[:3, 3], beams, lidar_regions(scene, pose, 360, LIDAR_MAX_RANGE), LIDAR_MAX_RANGE)
        full = sc.cast(scene, pose[:3, 3], beams, every_box(64, 360), LIDAR_MAX_RANGE)
        np.testing.assert_array_equal(culled[0], full[0])
    image, depth = render_camera(scene, velo_poses[0] @ rig.T_velo_from_camera(2), rig.K, 48, 160)
    assert image.shape == (48, 160, 3) and depth.shape == (48, 160)


def test_cli_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["synth", "--out", str(tmp_path), "--drives", "1", "--frames", "2", "--height", "24", "--width", "80",
            "--azimuth-steps", "100", "--seed", "2"]
    assert cli_main(args) == 0
    image = tmp_path / "2000_01_03" / "2000_01_03_drive_0001_sync" / "image_02" / "data" / "0000000001.png"
    before = image.read_bytes()
    # Running again must not silently replace what exists.
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err and image.read_bytes() == before
    # Another resolution into the same date folder would make the calibration lie.
    other_size = ["synth", "--out", str(tmp_path), "--frames", "2", "--height", "32", "--width", "80", "--seed", "2"]
    assert cli_main(other_size + ["--overwrite"]) == 2
    assert "different calibration" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0 and image.read_bytes() == before
    assert cli_main(["synth", "--out", str(tmp_path), "--frames", "0"]) == 2
    assert "--frames must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SynthError, match="height"):
        generate(tmp_path / "x", height=4)
