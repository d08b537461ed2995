"""`distill-depth synth`: synthetic drives in KITTI raw layout with exact depth and poses.

Each drive is a static procedural street (textured road, façades, parked cars, poles, crates, sky)
seen by KITTI's rig: colour cameras 2 and 3 (0.54 m baseline, 3 to the right) and a 64-beam
Velodyne 1.73 m above the road, all rendered by exact ray casting while the car drives forward
weaving slightly in its lane. Output, per date folder ``DATE`` (derived from the seed)::

    DATE/calib_cam_to_cam.txt, DATE/calib_velo_to_cam.txt     (KITTI format, images rectified)
    DATE/DATE_drive_XXXX_sync/image_02/data/%010d.png          (left colour camera)
    DATE/DATE_drive_XXXX_sync/image_03/data/%010d.png          (right colour camera)
    DATE/DATE_drive_XXXX_sync/velodyne_points/data/%010d.bin   (float32 x, y, z, reflectance)
    DATE/DATE_drive_XXXX_sync/proj_depth/groundtruth/image_0{2,3}/%010d.png  (uint16 m×256, 0 = sky)
    DATE/DATE_drive_XXXX_sync/poses.txt                        (camera 2 → world, see below)
    DATE/DATE_drive_XXXX_sync/proj_depth/regions/image_0{2,3}/%010d.png  (uint8 region bitmask, only with
        a failure mode or --regions; bits in ``distill_depth.data.regions``)
    DATE/DATE_drive_XXXX_sync/moving_objects.txt               (only with --moving-objects: one line per
        moving box, its world-frame velocity in metres per frame)

Failure modes (``synth_failures``, all off by default): --moving-objects N, --lidar-dropout,
--lidar-noise METRES, --textureless.

``poses.txt`` has one line per frame with the 12 numbers of the 3×4 matrix (row-major) that maps
points from camera 2 of that frame into the world frame, the world frame being camera 2 of frame 0
(KITTI odometry convention). So ``T_target_to_source = inv(pose_source) @ pose_target``. Camera 3
is camera 2 translated by ``+0.54 m`` along x (see the calibration files).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from distill_depth.data.kitti import encode_depth
from distill_depth.data.synth_calib import Rig, SynthError, write_calibration
from distill_depth.data.synth_scene import build_scene, trajectory
from distill_depth.data import synth_cityscapes
from distill_depth.data import synth_failures as failures
from distill_depth.data.synth_failures import FailureModes
from distill_depth.data.synth_regions import region_labels
from distill_depth.data.synth_sensors import DEFAULT_BEAMS, render_camera_hits, scan_lidar

DEFAULT_HEIGHT, DEFAULT_WIDTH = 96, 320
DEFAULT_AZIMUTH_STEPS = 2000  # HDL-64E at 10 Hz: ~0.18° between firings
CAMERAS = (2, 3)

__all__ = ["generate", "generate_drive", "date_for_seed", "drive_name", "read_poses", "SynthError"]


def date_for_seed(seed: int) -> str:
    """KITTI-style date folder name, distinct per seed: 2000_01_01 + seed days."""
    return (datetime.date(2000, 1, 1) + datetime.timedelta(days=int(seed))).strftime("%Y_%m_%d")


def drive_name(date: str, index: int) -> str:
    return f"{date}_drive_{index:04d}_sync"


def read_poses(path: str | Path) -> np.ndarray:
    """``poses.txt`` → (frames, 4, 4) float64 camera-2-to-world transforms."""
    rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if rows.shape[1] != 12:
        raise SynthError(f"{path}: expected 12 numbers per line, got {rows.shape[1]}")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :] = rows.reshape(-1, 3, 4)
    return poses


def _write_png(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) float [0, 1] → 8-bit RGB PNG (fast zlib level: these are intermediate files)."""
    Image.fromarray(np.round(image * 255.0).astype(np.uint8)).save(path, format="PNG", compress_level=1)


def _write_depth_png(path: Path, depth: np.ndarray) -> None:
    """(H, W) metres → uint16 metres×256 PNG, KITTI's encoding (``kitti.encode_depth``)."""
    Image.fromarray(encode_depth(depth)).save(path, format="PNG", compress_level=1)


def generate_drive(
    drive_dir: Path,
    rig: Rig,
    frames: int,
    seed: int,
    index: int,
    azimuth_steps: int = DEFAULT_AZIMUTH_STEPS,
    beams: int = DEFAULT_BEAMS,
    modes: FailureModes = FailureModes(),
) -> Path:
    """Render one drive into ``drive_dir`` (written into a temporary folder, renamed when complete)."""
    rng = np.random.default_rng([int(seed), int(index)])
    velo_poses = trajectory(rng, frames)
    x_end = float(velo_poses[-1, 0, 3]) + 300.0
    scene = build_scene(rng, x_start=-120.0, x_end=x_end)
    # Failure modes draw from their own streams, after the base scene: without them nothing changes.
    if modes.textureless:
        scene = failures.make_textureless(scene, failures.stream(seed, index, "textureless"), -120.0, x_end)
    velocity = None
    if modes.moving_objects > 0:
        scene, velocity = failures.add_moving_cars(
            scene, failures.stream(seed, index, "moving"), modes.moving_objects, float(velo_poses[-1, 0, 3])
        )
    tmp = drive_dir.with_name(f".{drive_dir.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    folders = {
        "image_02": tmp / "image_02" / "data",
        "image_03": tmp / "image_03" / "data",
        "velodyne": tmp / "velodyne_points" / "data",
        "gt_02": tmp / "proj_depth" / "groundtruth" / "image_02",
        "gt_03": tmp / "proj_depth" / "groundtruth" / "image_03",
    }
    if modes.writes_regions:
        folders.update({f"regions_0{c}": tmp / "proj_depth" / "regions" / f"image_0{c}" for c in CAMERAS})
    for folder in folders.values():
        folder.mkdir(parents=True)
    K = rig.K
    velo_from_camera = {camera: rig.T_velo_from_camera(camera) for camera in CAMERAS}
    camera2_poses = []
    for frame in range(frames):
        name = f"{frame:010d}"
        frame_scene = scene if velocity is None else failures.scene_at(scene, velocity, frame)
        for camera in CAMERAS:
            T_scene_cam = velo_poses[frame] @ velo_from_camera[camera]
            image, depth, hits = render_camera_hits(frame_scene, T_scene_cam, K, rig.height, rig.width)
            _write_png(folders[f"image_0{camera}"] / f"{name}.png", image)
            _write_depth_png(folders[f"gt_0{camera}"] / f"{name}.png", depth)
            if modes.writes_regions:
                labels = region_labels(frame_scene, hits, velo_poses[frame], beams, float(K[1, 1]))
                Image.fromarray(labels).save(folders[f"regions_0{camera}"] / f"{name}.png", compress_level=1)
            if camera == 2:
                camera2_poses.append(T_scene_cam)
        lidar_rng = failures.stream(seed, index, "lidar", frame) if modes.alters_lidar else None
        points = scan_lidar(frame_scene, velo_poses[frame], azimuth_steps, beams=beams, modes=modes, rng=lidar_rng)
        (folders["velodyne"] / f"{name}.bin").write_bytes(points.tobytes())
    world_from_scene = np.linalg.inv(camera2_poses[0])
    lines = [" ".join(f"{v:.12e}" for v in (world_from_scene @ pose)[:3].ravel()) for pose in camera2_poses]
    (tmp / "poses.txt").write_text("\n".join(lines) + "\n")
    if velocity is not None:  # moving objects' velocities in the world frame, metres per frame
        moving = (world_from_scene[:3, :3] @ velocity[scene.moving].T).T
        (tmp / "moving_objects.txt").write_text("".join(" ".join(f"{v:.12e}" for v in row) + "\n" for row in moving))
    tmp.replace(drive_dir)
    return drive_dir


def _generate_drive_job(job: tuple[str, int, int, int, int, int, int, int, FailureModes]) -> str:
    drive_dir, height, width, frames, seed, index, azimuth_steps, beams, modes = job
    return str(generate_drive(Path(drive_dir), Rig(height, width), frames, seed, index, azimuth_steps, beams, modes))


def generate(
    out: str | Path,
    drives: int = 2,
    frames: int = 100,
    seed: int = 0,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    *,
    azimuth_steps: int = DEFAULT_AZIMUTH_STEPS,
    beams: int = DEFAULT_BEAMS,
    modes: FailureModes = FailureModes(),
    date: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``drives`` synthetic drives of ``frames`` frames under ``out/DATE``; returns the drive folders.

    Deterministic for (drives' index, frames, seed, height, width, azimuth_steps, beams, modes). An existing
    drive folder is an error unless ``overwrite``. ``modes`` (``synth_failures.FailureModes``) turns on the
    failure modes; its defaults give the clean world, byte-identical to a generator without them.
    """
    for name, value, low in (("drives", drives, 1), ("frames", frames, 1), ("height", height, 8), ("width", width, 8),
                             ("azimuth_steps", azimuth_steps, 16), ("beams", beams, 1), ("workers", workers, 1)):
        if int(value) != value or value < low:
            raise SynthError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if int(modes.moving_objects) != modes.moving_objects or modes.moving_objects < 0:
        raise SynthError(f"--moving-objects must be an integer >= 0, got {modes.moving_objects!r}")
    if not (np.isfinite(modes.lidar_noise) and 0.0 <= modes.lidar_noise <= 1.0):
        raise SynthError(f"--lidar-noise must be a standard deviation in metres in [0, 1], got {modes.lidar_noise!r}")
    date = date_for_seed(seed) if date is None else date
    if not re.fullmatch(r"[A-Za-z0-9_-]+", date):
        raise SynthError(f"--date must be a plain folder name like 2000_01_01, got {date!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise SynthError(f"--out {out} exists and is not a folder")
    date_dir = Path(out) / date
    date_dir.mkdir(parents=True, exist_ok=True)
    rig = Rig(int(height), int(width))
    write_calibration(date_dir, rig)
    drive_dirs = [date_dir / drive_name(date, index + 1) for index in range(drives)]
    existing = [d for d in drive_dirs if d.exists()]
    if existing and not overwrite:
        raise SynthError(f"{existing[0]} already exists; pass --overwrite to replace it (or choose another --out)")
    for d in existing:
        shutil.rmtree(d)
    jobs = [
        (str(d), rig.height, rig.width, frames, seed, index + 1, azimuth_steps, beams, modes)
        for index, d in enumerate(drive_dirs)
    ]
    start = time.perf_counter()
    if workers == 1:
        done = (_generate_drive_job(job) for job in jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        done = pool.map(_generate_drive_job, jobs)
    try:
        for count, drive_dir in enumerate(done, 1):
            if progress:
                elapsed = time.perf_counter() - start
                rate = count * frames / elapsed
                print(f"[synth] {count}/{drives} {drive_dir} ({rate:.1f} frames/s)", file=sys.stderr)
    finally:
        if pool is not None:
            pool.shutdown()
    return drive_dirs


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=("kitti", "cityscapes"), default="kitti",
                        help="kitti: KITTI raw drives (default); cityscapes: snippets in the official Cityscapes "
                             "layout (synth_cityscapes; --split, --cities, --sequences)")
    parser.add_argument("--out", required=True, help="output root (a KITTI raw tree: OUT/DATE/DATE_drive_XXXX_sync)")
    parser.add_argument("--drives", type=int, default=2, help="number of drives (default 2)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per drive at 10 Hz (default 100); cityscapes: per snippet (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed; also picks the date folder 2000_01_01 + seed days")
    parser.add_argument("--height", type=int, default=None,
                        help=f"image height (default {DEFAULT_HEIGHT}; cityscapes {synth_cityscapes.DEFAULT_HEIGHT})")
    parser.add_argument("--width", type=int, default=None,
                        help=f"image width (default {DEFAULT_WIDTH}; cityscapes {synth_cityscapes.DEFAULT_WIDTH})")
    parser.add_argument("--azimuth-steps", type=int, default=DEFAULT_AZIMUTH_STEPS,
                        help=f"LiDAR firings per revolution (default {DEFAULT_AZIMUTH_STEPS})")
    parser.add_argument("--beams", type=int, default=DEFAULT_BEAMS,
                        help=f"LiDAR beams over the HDL-64E's +2..-24.8 degrees (default {DEFAULT_BEAMS}; "
                             "fewer = sparser LiDAR)")
    failure = parser.add_argument_group("failure modes (all off by default; see docs/synth-failure-modes.md)")
    failure.add_argument("--moving-objects", type=int, default=0, metavar="N",
                         help="N cars per drive in the adjacent lane with their own velocity (default 0)")
    failure.add_argument("--lidar-dropout", action="store_true",
                         help="no LiDAR return on glass (a share returns from behind it) and often none on dark paint")
    failure.add_argument("--lidar-noise", type=float, default=0.0, metavar="METRES",
                         help="Gaussian LiDAR range noise, standard deviation in metres (default 0 = none)")
    failure.add_argument("--textureless", action="store_true", help="uniform-albedo façades and road patches")
    failure.add_argument("--regions", action="store_true",
                         help="write proj_depth/regions even with no failure mode (any failure mode writes them)")
    parser.add_argument("--date", default=None, help="date folder name (default from --seed)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one drive each (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace drives that already exist")
    cityscapes = parser.add_argument_group("--layout cityscapes")
    cityscapes.add_argument("--split", default="train", help="train | val | test (default train)")
    cityscapes.add_argument("--cities", type=int, default=1, help="cities synth0, synth1, ... (default 1)")
    cityscapes.add_argument("--sequences", type=int, default=2, help="snippets per city (default 2)")


def _run_cityscapes(args: argparse.Namespace) -> int:
    height = synth_cityscapes.DEFAULT_HEIGHT if args.height is None else args.height
    width = synth_cityscapes.DEFAULT_WIDTH if args.width is None else args.width
    try:
        frames = synth_cityscapes.generate(args.out, args.split, args.cities, args.sequences, args.frames or 30,
                                           args.seed, height, width, overwrite=args.overwrite)
    except SynthError as error:
        print(f"distill-depth synth: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"distill-depth synth: error: cannot write under {args.out}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(frames)} frames ({args.cities} cities × {args.sequences} snippets, {width}x{height}) "
          f"in the Cityscapes layout to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.layout == "cityscapes":
        return _run_cityscapes(args)
    args.frames = 100 if args.frames is None else args.frames
    args.height = DEFAULT_HEIGHT if args.height is None else args.height
    args.width = DEFAULT_WIDTH if args.width is None else args.width
    start = time.perf_counter()
    try:
        drive_dirs = generate(
            args.out, args.drives, args.frames, args.seed, args.height, args.width,
            azimuth_steps=args.azimuth_steps, beams=args.beams, date=args.date, workers=args.workers,
            modes=FailureModes(args.moving_objects, args.lidar_dropout, args.lidar_noise, args.textureless,
                               args.regions),
            overwrite=args.overwrite, progress=True,
        )
    except SynthError as error:
        print(f"distill-depth synth: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a read-only or full --out: name the path, no traceback
        print(f"distill-depth synth: error: cannot write under {args.out}: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    total = len(drive_dirs) * args.frames
    print(f"wrote {len(drive_dirs)} drives × {args.frames} frames ({total} frames, {args.width}x{args.height}) "
          f"to {Path(args.out) / drive_dirs[0].parent.name} in {elapsed:.1f} s ({total / elapsed:.1f} frames/s)")
    return 0
