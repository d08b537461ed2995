"""KITTI raw layout: calibration, Velodyne scans, the Eigen ground-truth projection, split files.

Camera conventions are KITTI's: camera 2 is the left colour camera (side ``l``), camera 3 the
right one (side ``r``); all rectified cameras share the orientation of rectified camera 0.
Intrinsics handed to the rest of the project are 3×3 in **0-based pixel-centre** coordinates at
the stored resolution: KITTI's ``P_rect`` is 1-based (the Eigen ground truth puts a point at
pixel ``round(u) - 1``), so ``cx0 = cx - 1`` at native size, and a resize by ``s`` maps
``c -> (c + 0.5) * s - 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE_TO_CAMERA = {"l": 2, "r": 3}
DEPTH_PNG_SCALE = 256.0
"""Depth PNGs hold uint16 metres × 256 (KITTI depth benchmark encoding); 0 = no value."""


class KittiDataError(ValueError):
    """A KITTI file is missing or malformed; the message names the file, the key and the problem."""


# ---------------------------------------------------------------------------------------------
# calibration


def read_calib_file(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a KITTI ``key: v1 v2 ...`` calibration file into float64 arrays.

    Lines whose value is not numeric (``calib_time: 09-Jan-2012 13:57:47``) are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KittiDataError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KittiDataError(f"{path}: cannot read calibration file ({error})") from None
    values: dict[str, np.ndarray] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise KittiDataError(f"{path}:{line_no}: expected 'key: values', got {line.strip()!r}")
        try:
            values[key.strip()] = np.array([float(v) for v in rest.split()], dtype=np.float64)
        except ValueError:
            continue  # dates and other non-numeric metadata
    return values


def _matrix(values: dict[str, np.ndarray], key: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    if key not in values:
        raise KittiDataError(f"{path}: key {key!r} missing")
    array = values[key]
    if array.size != int(np.prod(shape)):
        raise KittiDataError(
            f"{path}: key {key!r} has {array.size} values, expected {int(np.prod(shape))} ({shape})"
        )
    if not np.all(np.isfinite(array)):
        raise KittiDataError(f"{path}: key {key!r} has non-finite values")
    return array.reshape(shape)


@dataclass(frozen=True)
class DriveCalibration:
    """Calibration of one recording date.

    velo_to_cam0: ``(4, 4)`` Velodyne → unrectified camera 0.
    rect_00: ``(4, 4)`` R_rect_00 padded to 4×4 (camera 0 → rectified camera 0).
    P_rect: ``{camera: (3, 4)}`` rectified camera 0 → 1-based pixel of rectified camera ``camera``.
    image_size: ``{camera: (height, width)}`` from ``S_rect_0X`` where present.
    """

    velo_to_cam0: np.ndarray
    rect_00: np.ndarray
    P_rect: dict[int, np.ndarray]
    image_size: dict[int, tuple[int, int]]

    def velo_to_rect(self) -> np.ndarray:
        """``(4, 4)`` Velodyne → rectified camera 0."""
        return self.rect_00 @ self.velo_to_cam0

    def camera_offset(self, camera: int) -> np.ndarray:
        """``(3,)`` t with X_camera = X_rect0 + t (rectified cameras differ by a translation)."""
        P = self._P(camera)
        return np.linalg.solve(P[:, :3], P[:, 3])

    def _P(self, camera: int) -> np.ndarray:
        if camera not in self.P_rect:
            raise KittiDataError(f"calib_cam_to_cam.txt: key 'P_rect_0{camera}' missing")
        return self.P_rect[camera]


def load_calibration(date_dir: str | Path) -> DriveCalibration:
    """Read ``calib_cam_to_cam.txt`` and ``calib_velo_to_cam.txt`` of a KITTI date folder."""
    date_dir = Path(date_dir)
    cam_path = date_dir / "calib_cam_to_cam.txt"
    velo_path = date_dir / "calib_velo_to_cam.txt"
    cam = read_calib_file(cam_path)
    velo = read_calib_file(velo_path)
    velo_to_cam0 = np.eye(4)
    velo_to_cam0[:3, :3] = _matrix(velo, "R", (3, 3), velo_path)
    velo_to_cam0[:3, 3] = _matrix(velo, "T", (3,), velo_path)
    rect_00 = np.eye(4)
    rect_00[:3, :3] = _matrix(cam, "R_rect_00", (3, 3), cam_path)
    P_rect = {c: _matrix(cam, f"P_rect_0{c}", (3, 4), cam_path) for c in range(4) if f"P_rect_0{c}" in cam}
    if 2 not in P_rect:
        _matrix(cam, "P_rect_02", (3, 4), cam_path)  # raises the "missing" error
    image_size = {}
    for c in range(4):
        if f"S_rect_0{c}" in cam:
            width, height = _matrix(cam, f"S_rect_0{c}", (2,), cam_path)
            image_size[c] = (int(round(height)), int(round(width)))
    return DriveCalibration(velo_to_cam0, rect_00, P_rect, image_size)


def scaled_projection(calib: DriveCalibration, camera: int, orig_hw: tuple[int, int],
                      out_hw: tuple[int, int]) -> np.ndarray:
    """``(3, 4)`` P_rect of ``camera`` for an image resized from ``orig_hw`` to ``out_hw``.

    Keeps KITTI's 1-based convention: u1' = (u1 - 0.5)·s + 0.5, so ``round(u') - 1`` is the pixel
    whose centre is nearest; at ``out_hw == orig_hw`` it is P_rect itself, bit for bit.
    """
    P = calib._P(camera).copy()
    (h0, w0), (h1, w1) = orig_hw, out_hw
    if (h0, w0) != (h1, w1):
        sx, sy = w1 / w0, h1 / h0
        P[0] = sx * P[0] + 0.5 * (1.0 - sx) * P[2]
        P[1] = sy * P[1] + 0.5 * (1.0 - sy) * P[2]
    return P


def intrinsics(calib: DriveCalibration, camera: int, orig_hw: tuple[int, int],
               out_hw: tuple[int, int]) -> np.ndarray:
    """``(3, 3)`` float64 K of rectified ``camera`` at ``out_hw``, 0-based pixel centres."""
    K = calib._P(camera)[:, :3].copy()
    K[0, 2] -= 1.0
    K[1, 2] -= 1.0
    (h0, w0), (h1, w1) = orig_hw, out_hw
    sx, sy = w1 / w0, h1 / h0
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def stereo_transform(calib: DriveCalibration, target_camera: int, source_camera: int) -> np.ndarray:
    """``(4, 4)`` T with X_source = T · X_target between two rectified cameras (a translation)."""
    T = np.eye(4)
    T[:3, 3] = calib.camera_offset(source_camera) - calib.camera_offset(target_camera)
    return T


def stereo_baseline(calib: DriveCalibration) -> float:
    """Distance in metres between the centres of rectified cameras 2 and 3 (≈ 0.54 m on KITTI)."""
    if 3 not in calib.P_rect:
        return float("nan")
    return float(np.linalg.norm(calib.camera_offset(3) - calib.camera_offset(2)))


# ---------------------------------------------------------------------------------------------
# Velodyne and the Eigen projection


def load_velodyne(path: str | Path) -> np.ndarray:
    """``(N, 4)`` float32 x, y, z, reflectance in the Velodyne frame."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KittiDataError(f"{path}: Velodyne scan not found") from None
    if len(raw) % 16:
        raise KittiDataError(
            f"{path}: {len(raw)} bytes is not a multiple of 16 (4 float32 per point): truncated scan"
        )
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, 4)
    if not np.all(np.isfinite(points)):
        raise KittiDataError(f"{path}: non-finite values in Velodyne scan")
    return points


def project_velodyne(points: np.ndarray, calib: DriveCalibration, camera: int,
                     orig_hw: tuple[int, int], out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Sparse depth ``(H, W)`` float32 metres (0 = no point): the KITTI Eigen ground truth.

    Velodyne → cam0 → R_rect_00 → P_rect_0X; points with x_velo < 0 dropped; depth is the third
    homogeneous coordinate of P·X; pixel = (round(u) - 1, round(v) - 1) with numpy's round;
    pixels outside the image dropped; when several points share a pixel the nearest wins;
    negative depths are cleared at the end (all as in the standard ``generate_depth_map``).
    At a reduced ``out_hw`` the same is done with the scaled projection (no interpolation).
    """
    out_hw = orig_hw if out_hw is None else out_hw
    height, width = out_hw
    velo = points[points[:, 0] >= 0].astype(np.float64)
    velo[:, 3] = 1.0
    P = scaled_projection(calib, camera, orig_hw, out_hw) @ calib.velo_to_rect()
    image_points = velo @ P.T
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(image_points[:, 0] / image_points[:, 2]) - 1
        v = np.round(image_points[:, 1] / image_points[:, 2]) - 1
    inside = (u >= 0) & (v >= 0) & (u < width) & (v < height)
    flat = v[inside].astype(np.int64) * width + u[inside].astype(np.int64)
    z = image_points[inside, 2]
    depth = np.full(height * width, np.inf)
    np.minimum.at(depth, flat, z)
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth.reshape(height, width).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# files and split lines


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: ``2011_09_26/2011_09_26_drive_0022_sync 473 l``."""

    drive_path: str  # "2011_09_26/2011_09_26_drive_0022_sync"
    frame: int
    side: str  # "l" | "r"

    @property
    def date(self) -> str:
        return self.drive_path.split("/")[0]

    @property
    def drive(self) -> str:
        return self.drive_path.split("/")[-1]

    @property
    def camera(self) -> int:
        return SIDE_TO_CAMERA[self.side]

    @property
    def key(self) -> str:
        """Shard sample key ``{drive}_{side}_{frame:010d}`` (no dots)."""
        return f"{self.drive}_{self.side}_{self.frame:010d}".replace(".", "_")


def read_split_file(path: str | Path) -> list[SplitEntry]:
    """Parse a monodepth2-style split file (``DATE/DRIVE FRAME SIDE`` per line)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise KittiDataError(f"{path}: split file not found") from None
    entries = []
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in SIDE_TO_CAMERA or "/" not in fields[0]:
            raise KittiDataError(
                f"{path}:{line_no}: expected 'DATE/DRIVE FRAME l|r', got {line.strip()!r}"
            )
        try:
            frame = int(fields[1])
        except ValueError:
            raise KittiDataError(f"{path}:{line_no}: frame {fields[1]!r} is not an integer") from None
        entries.append(SplitEntry(fields[0].strip("/"), frame, fields[2]))
    return entries


def image_path(root: Path, drive_path: str, camera: int, frame: int) -> Path:
    return Path(root) / drive_path / f"image_0{camera}" / "data" / f"{frame:010d}.png"


def velodyne_path(root: Path, drive_path: str, frame: int) -> Path:
    return Path(root) / drive_path / "velodyne_points" / "data" / f"{frame:010d}.bin"


def groundtruth_path(root: Path, drive_path: str, camera: int, frame: int) -> Path:
    """``proj_depth/groundtruth/image_0X`` inside the drive folder (synthetic / merged trees)."""
    return Path(root) / drive_path / "proj_depth" / "groundtruth" / f"image_0{camera}" / f"{frame:010d}.png"


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, fully decoded (a corrupt or missing file raises :class:`KittiDataError`)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise KittiDataError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise KittiDataError(f"{path}: corrupt image ({error})") from None


def read_png16(path: str | Path, what: str = "depth PNG") -> np.ndarray:
    """The raw ``(H, W)`` integer array of a 16-bit single-channel PNG; errors name the file and ``what``."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except FileNotFoundError:
        raise KittiDataError(f"{path}: {what} not found") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise KittiDataError(f"{path}: corrupt {what} ({error})") from None
    if array.ndim != 2 or array.dtype not in (np.uint16, np.int32, np.uint8):
        raise KittiDataError(f"{path}: expected a 16-bit single-channel PNG, got {array.dtype} {array.shape}")
    return array


def read_depth_png(path: str | Path) -> np.ndarray:
    """``(H, W)`` float32 metres from a uint16 metres×256 PNG (0 = no value)."""
    return read_png16(path).astype(np.float32) / DEPTH_PNG_SCALE


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """``(H, W)`` metres → uint16 metres×256 (rounded; clipped to the uint16 range)."""
    depth = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(depth * DEPTH_PNG_SCALE), 0, 65535).astype(np.uint16)


def write_depth_png(path: str | Path, depth: np.ndarray) -> None:
    """Write ``(H, W)`` metres as a uint16 metres×256 PNG."""
    Image.fromarray(encode_depth(depth)).save(path, format="PNG")
