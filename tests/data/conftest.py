"""Small hand-made KITTI raw trees (tiny images, a few LiDAR points) for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill_depth.data import kitti

FX, FY, CX, CY = 40.0, 40.0, 24.5, 8.5  # KITTI-like 1-based principal point
BASELINE = 0.5


def _line(key: str, values) -> str:
    return f"{key}: " + " ".join(f"{v:.12e}" for v in np.ravel(values)) + "\n"


def write_calibration(date_dir: Path, height: int, width: int) -> None:
    """KITTI-format calibration: axes as on the KITTI rig, cameras 2/3 0.06 m / -0.44 m from 0."""
    date_dir.mkdir(parents=True, exist_ok=True)
    cam = "calib_time: 09-Jan-2012 13:57:47\n" + _line("R_rect_00", np.eye(3))
    for camera, offset in ((0, 0.0), (1, -BASELINE), (2, 0.06), (3, 0.06 - BASELINE)):
        P = np.array([[FX, 0, CX, FX * offset], [0, FY, CY, 0], [0, 0, 1, 0]])
        cam += _line(f"S_rect_0{camera}", [width, height]) + _line(f"P_rect_0{camera}", P)
    (date_dir / "calib_cam_to_cam.txt").write_text(cam)
    R = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]])  # camera x = -velo y, y = -velo z, z = velo x
    velo = "calib_time: 15-Mar-2012 11:37:16\n" + _line("R", R) + _line("T", [0.0, -0.08, -0.27])
    (date_dir / "calib_velo_to_cam.txt").write_text(velo)


def random_scan(rng: np.random.Generator, n: int = 400) -> np.ndarray:
    x = rng.uniform(-5, 30, n)  # some behind the sensor (x < 0): dropped by the projection
    y = rng.uniform(-0.6, 0.6, n) * np.abs(x)
    z = rng.uniform(-0.2, 0.2, n) * np.abs(x)
    return np.stack([x, y, z, rng.uniform(0, 1, n)], 1).astype(np.float32)


def make_tree(root: Path, *, drives: int = 1, frames: int = 6, height: int = 16, width: int = 48,
              stereo: bool = True, gt: bool = True, lidar_frames: range | None = None, seed: int = 0,
              date: str = "2011_01_01") -> Path:
    """A KITTI raw tree ``root/date/date_drive_000N_sync`` with random images and scans."""
    rng = np.random.default_rng(seed)
    write_calibration(root / date, height, width)
    cameras = (2, 3) if stereo else (2,)
    for d in range(drives):
        drive = root / date / f"{date}_drive_{d + 1:04d}_sync"
        for frame in range(frames):
            for camera in cameras:
                folder = drive / f"image_0{camera}" / "data"
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{frame:010d}.png")
                if gt:
                    gt_dir = drive / "proj_depth" / "groundtruth" / f"image_0{camera}"
                    gt_dir.mkdir(parents=True, exist_ok=True)
                    kitti.write_depth_png(gt_dir / f"{frame:010d}.png", rng.uniform(1, 80, (height, width)))
            if lidar_frames is None or frame in lidar_frames:
                velo_dir = drive / "velodyne_points" / "data"
                velo_dir.mkdir(parents=True, exist_ok=True)
                random_scan(rng).tofile(velo_dir / f"{frame:010d}.bin")
    return root


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    """One drive, 6 frames (4 usable targets), stereo + ground truth."""
    return make_tree(tmp_path / "raw")


@pytest.fixture(scope="session")
def stream_shards(tmp_path_factory) -> Path:
    """32 samples in 8 shards of 4 (balanced), tiny images, stereo; shared by the stream tests."""
    from distill_depth.data.shards import ShardOptions, entries_from_drives, make_shards

    base = tmp_path_factory.mktemp("stream")
    root = make_tree(base / "raw", drives=2, frames=18, seed=3)  # 2 × 16 targets
    out = base / "shards"
    entries = entries_from_drives(root, "*/*_sync", "l")
    make_shards(root, out, entries, options=ShardOptions(str(out), None, True, 95), samples_per_shard=4,
                workers=1, split_info={"kind": "drives"}, progress=False)
    return out
