"""Calibration, Velodyne loading and the Eigen projection, on the real KITTI drive and by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill_depth.data import kitti
from distill_depth.data.kitti import DriveCalibration, KittiDataError

DRIVE = "2011_09_26/2011_09_26_drive_unknown_sync"
NATIVE = (375, 1242)


@pytest.fixture(scope="module")
def real_calib(kitti_raw_root: Path) -> DriveCalibration:
    return kitti.load_calibration(kitti_raw_root / "2011_09_26")


def reference_projection(points: np.ndarray, date_dir: Path, camera: int, out_hw=None) -> np.ndarray:
    """Independent, straightforward implementation of the Eigen GT formula, one point at a time."""
    def parse(path):
        out = {}
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            try:
                out[key] = np.array([float(x) for x in rest.split()])
            except ValueError:
                pass
        return out

    cam, velo = parse(date_dir / "calib_cam_to_cam.txt"), parse(date_dir / "calib_velo_to_cam.txt")
    Tr = np.vstack([np.hstack([velo["R"].reshape(3, 3), velo["T"].reshape(3, 1)]), [0, 0, 0, 1]])
    R0 = np.eye(4)
    R0[:3, :3] = cam["R_rect_00"].reshape(3, 3)
    P = cam[f"P_rect_0{camera}"].reshape(3, 4)
    width, height = cam[f"S_rect_0{camera}"].astype(int)
    oh, ow = out_hw or (height, width)
    sx, sy = ow / width, oh / height
    best: dict[tuple[int, int], float] = {}
    for x, y, z, _ in points.astype(np.float64):
        if x < 0:
            continue
        p = P @ R0 @ Tr @ np.array([x, y, z, 1.0])
        u, v = p[0] / p[2], p[1] / p[2]  # 1-based pixel coordinates at native size
        u, v = (u - 0.5) * sx + 0.5, (v - 0.5) * sy + 0.5  # same image area, smaller pixels
        col, row = int(np.round(u)) - 1, int(np.round(v)) - 1
        if 0 <= col < ow and 0 <= row < oh:
            best[(row, col)] = min(best.get((row, col), np.inf), p[2])
    depth = np.zeros((oh, ow))
    for (row, col), d in best.items():
        depth[row, col] = max(d, 0.0)
    return depth


# ---- calibration -----------------------------------------------------------------------------


def test_real_calibration_values(real_calib: DriveCalibration) -> None:
    assert real_calib.image_size[2] == NATIVE
    np.testing.assert_allclose(real_calib.P_rect[2][0], [721.5377, 0, 609.5593, 44.85728])
    np.testing.assert_allclose(real_calib.velo_to_cam0[:3, 3], [-4.069766e-03, -7.631618e-02, -2.717806e-01])
    assert real_calib.rect_00[3, 3] == 1 and abs(real_calib.rect_00[0, 1] - 9.837760e-03) < 1e-12
    # rectified cameras 2 and 3: baseline (44.857 + 339.524) / 721.54 ≈ 0.5327 m
    assert kitti.stereo_baseline(real_calib) == pytest.approx(0.5327, abs=2e-4)
    T = kitti.stereo_transform(real_calib, 2, 3)
    assert T[0, 3] == pytest.approx(-0.5327, abs=2e-4)  # right camera sees the world shifted left
    np.testing.assert_allclose(T[:3, :3], np.eye(3))
    np.testing.assert_allclose(kitti.stereo_transform(real_calib, 3, 2), np.linalg.inv(T), atol=1e-12)


def test_intrinsics_convention(real_calib: DriveCalibration) -> None:
    K = kitti.intrinsics(real_calib, 2, NATIVE, NATIVE)
    np.testing.assert_allclose(K, [[721.5377, 0, 608.5593], [0, 721.5377, 171.854], [0, 0, 1]])
    K2 = kitti.intrinsics(real_calib, 2, NATIVE, (96, 320))
    sx, sy = 320 / 1242, 96 / 375
    np.testing.assert_allclose(K2[0], [721.5377 * sx, 0, (608.5593 + 0.5) * sx - 0.5])
    np.testing.assert_allclose(K2[1], [0, 721.5377 * sy, (171.854 + 0.5) * sy - 0.5])


@pytest.mark.parametrize("problem", ["missing_file", "missing_key", "short_key", "bad_line"])
def test_bad_calibration(tmp_path: Path, kitti_raw_root: Path, problem: str) -> None:
    date = tmp_path / "2011_09_26"
    date.mkdir()
    source = kitti_raw_root / "2011_09_26"
    cam = (source / "calib_cam_to_cam.txt").read_text()
    velo = (source / "calib_velo_to_cam.txt").read_text()
    expected = {"missing_file": "calib_velo_to_cam.txt", "missing_key": "R_rect_00",
                "short_key": "P_rect_02", "bad_line": "calib_cam_to_cam.txt:1"}[problem]
    if problem == "missing_key":
        cam = "\n".join(l for l in cam.splitlines() if not l.startswith("R_rect_00"))
    if problem == "short_key":
        cam = cam.replace("P_rect_02: 7.215377e+02 ", "P_rect_02: ")
    if problem == "bad_line":
        cam = "this line has no colon\n" + cam
    (date / "calib_cam_to_cam.txt").write_text(cam)
    if problem != "missing_file":
        (date / "calib_velo_to_cam.txt").write_text(velo)
    with pytest.raises(KittiDataError, match=expected.replace(".", r"\.")) as info:
        kitti.load_calibration(date)
    assert str(date) in str(info.value)


# ---- Velodyne + projection -------------------------------------------------------------------


def test_real_scan_and_projection(kitti_raw_root: Path, real_calib: DriveCalibration) -> None:
    scan = kitti.load_velodyne(kitti.velodyne_path(kitti_raw_root, DRIVE, 0))
    assert scan.shape == (114278, 4) and scan.dtype == np.float32
    depth = kitti.project_velodyne(scan, real_calib, 2, NATIVE)
    valid = depth > 0
    assert depth.shape == NATIVE and 15_000 < valid.sum() < 17_500  # "about 16k" (SOURCES.md)
    assert 2.5 < depth[valid].min() < 3.5 and 70 < depth.max() < 80.5
    reference = reference_projection(scan, kitti_raw_root / "2011_09_26", 2)
    np.testing.assert_allclose(depth, reference, rtol=1e-6, atol=1e-5)
    # the bottom-left of the image sees the road a few metres ahead: sanity of orientation
    assert valid[250:].sum() > valid[:100].sum()


def test_real_projection_reduced(kitti_raw_root: Path, real_calib: DriveCalibration) -> None:
    scan = kitti.load_velodyne(kitti.velodyne_path(kitti_raw_root, DRIVE, 15))
    depth = kitti.project_velodyne(scan, real_calib, 2, NATIVE, (96, 320))
    reference = reference_projection(scan, kitti_raw_root / "2011_09_26", 2, (96, 320))
    np.testing.assert_allclose(depth, reference, rtol=1e-6, atol=1e-5)
    assert 8_000 < (depth > 0).sum() < 12_000
    # K at the stored resolution puts each point at the pixel it was written to (0-based centres)
    K = kitti.intrinsics(real_calib, 2, NATIVE, (96, 320))
    X = (real_calib.velo_to_rect() @ np.c_[scan[:, :3], np.ones(len(scan))].T)[:3]
    X = X + real_calib.camera_offset(2)[:, None]
    front = (scan[:, 0] >= 0) & (X[2] > 1)
    uv = (K @ X[:, front])[:2] / X[2, front]
    cols, rows = np.round(uv).astype(int)
    inside = (cols >= 0) & (cols < 320) & (rows >= 0) & (rows < 96)
    assert (depth[rows[inside], cols[inside]] > 0).mean() > 0.999


def _identity_calib(width: int = 48, height: int = 16) -> DriveCalibration:
    P = np.array([[40.0, 0, 24.5, 0], [0, 40.0, 8.5, 0], [0, 0, 1, 0]])
    return DriveCalibration(np.eye(4), np.eye(4), {2: P}, {2: (height, width)})


def test_pixel_convention_and_dropping() -> None:
    calib = _identity_calib()  # velodyne = camera axes, so x_velo is the camera's x here
    # u = 40·x/z + 24.5 (1-based) → column round(u) - 1 (numpy rounds halves to even)
    points = np.array([
        [0.5, 0.0, 10.0, 1],    # u = 26.5 → 26 → col 25; v = 8.5 → 8 → row 7
        [0.25, 0.25, 4.0, 1],   # u = 27.0 → col 26; v = 11.0 → row 10
        [-0.5, 0.0, 10.0, 1],   # x_velo < 0: dropped although it projects inside
        [20.0, 0.0, 1.0, 1],    # u = 824.5: outside, dropped
    ], dtype=np.float32)
    depth = kitti.project_velodyne(points, calib, 2, (16, 48))
    assert depth[7, 25] == pytest.approx(10.0) and depth[10, 26] == pytest.approx(4.0)
    assert (depth > 0).sum() == 2
    # left edge: with cx = -10, u = 1.4 → col 0 is inside, u = 0.4 → col -1 is dropped
    shifted = DriveCalibration(np.eye(4), np.eye(4), {2: np.array([[40.0, 0, -10, 0], [0, 40.0, 8.5, 0],
                                                                    [0, 0, 1, 0]])}, {})
    inside = kitti.project_velodyne(np.array([[2.85, 0, 10, 1]], np.float32), shifted, 2, (16, 48))
    outside = kitti.project_velodyne(np.array([[2.6, 0, 10, 1]], np.float32), shifted, 2, (16, 48))
    assert inside[7, 0] == pytest.approx(10.0) and (outside > 0).sum() == 0


def test_nearest_point_wins_in_any_order() -> None:
    calib = _identity_calib()
    same_ray = np.array([[0.25 * d, 0.125 * d, d, 1] for d in (30.0, 5.0, 12.0)], dtype=np.float32)
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        depth = kitti.project_velodyne(same_ray[order], calib, 2, (16, 48))
        assert (depth > 0).sum() == 1 and depth[13, 33] == pytest.approx(5.0)


def test_truncated_and_missing_scan(tmp_path: Path) -> None:
    path = tmp_path / "0000000000.bin"
    np.zeros((10, 4), np.float32).tofile(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(KittiDataError, match=r"0000000000\.bin.*truncated"):
        kitti.load_velodyne(path)
    with pytest.raises(KittiDataError, match="not found"):
        kitti.load_velodyne(tmp_path / "nope.bin")


# ---- files -----------------------------------------------------------------------------------


def test_split_file(tmp_path: Path) -> None:
    split = tmp_path / "split.txt"
    split.write_text("2011_09_26/2011_09_26_drive_0022_sync 473 l\n\n2011_09_29/x_sync 0000000001 r\n")
    entries = kitti.read_split_file(split)
    assert [(e.drive_path, e.frame, e.side) for e in entries] == [
        ("2011_09_26/2011_09_26_drive_0022_sync", 473, "l"), ("2011_09_29/x_sync", 1, "r")]
    assert entries[0].key == "2011_09_26_drive_0022_sync_l_0000000473" and entries[1].camera == 3
    split.write_text("2011_09_26/2011_09_26_drive_0022_sync 473 x\n")
    with pytest.raises(KittiDataError, match=r"split\.txt:1"):
        kitti.read_split_file(split)


def test_depth_png_round_trip_and_errors(tmp_path: Path) -> None:
    depth = np.array([[0.0, 1.0 / 256, 5.5], [79.99, 255.99, 0.3]], np.float32)
    kitti.write_depth_png(tmp_path / "d.png", depth)
    back = kitti.read_depth_png(tmp_path / "d.png")
    assert back.dtype == np.float32 and back[0, 0] == 0
    np.testing.assert_allclose(back, depth, atol=0.5 / 256)
    (tmp_path / "bad.png").write_bytes((tmp_path / "d.png").read_bytes()[:30])
    with pytest.raises(KittiDataError, match=r"bad\.png.*corrupt"):
        kitti.read_depth_png(tmp_path / "bad.png")
    with pytest.raises(KittiDataError, match="not found"):
        kitti.read_depth_png(tmp_path / "missing.png")
    with pytest.raises(KittiDataError, match=r"bad\.png.*corrupt"):
        kitti.read_image(tmp_path / "bad.png")
