"""Camera/LiDAR rig of the synthetic drives and its KITTI-format calibration files.

Frames (all right-handed, metres):
- Velodyne: x forward, y left, z up; mounted ``VELO_HEIGHT`` above the road.
- rectified cam0 ("rect0"): x right, y down, z forward; ``X_rect0 = R_rect_00 · (R · X_velo + T)``.
- camera i (rectified): same axes as rect0, centre at ``(CAMERA_CENTRES_X[i], 0, 0)`` in rect0, so
  ``P_rect_0i = K1 · [I | −c_i]`` with ``K1`` in KITTI's 1-based pixel coordinates.

The images are rendered directly in the rectified cameras (no distortion), so the standard KITTI
projection ``P_rect_02 · R_rect_00 · [R|T] · X_velo`` with ``pixel = round(u) − 1, round(v) − 1``
is exact for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# KITTI raw (2011_09_26) values the synthetic rig imitates.
KITTI_NATIVE_HW = (375, 1242)
KITTI_FOCAL = 721.5377
KITTI_CX0 = 608.5593  # 0-based principal point at native size (P_rect's 609.5593 − 1)
KITTI_CY0 = 171.8540
VELO_HEIGHT = 1.73
# Camera centres along rect0's x axis: cam1 0.54 m right of cam0, colour cams 2 (left) / 3 (right).
CAMERA_CENTRES_X = {0: 0.0, 1: 0.54, 2: -0.06, 3: 0.48}
STEREO_BASELINE = CAMERA_CENTRES_X[3] - CAMERA_CENTRES_X[2]


class SynthError(ValueError):
    """Bad options or an output folder the generator must not overwrite."""


def rotation_xyz(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation ``Rz · Ry · Rx`` from angles in radians (3, 3) float64."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = translation
    return transform


@dataclass(frozen=True)
class Rig:
    """Intrinsics and extrinsics shared by every drive of one date folder."""

    height: int
    width: int

    @property
    def K(self) -> np.ndarray:
        """(3, 3) intrinsics in 0-based pixel-centre coordinates at (height, width).

        KITTI's native camera resized: ``f · s`` and ``c → (c + 0.5) · s − 0.5`` per axis.
        """
        sy = self.height / KITTI_NATIVE_HW[0]
        sx = self.width / KITTI_NATIVE_HW[1]
        return np.array(
            [
                [KITTI_FOCAL * sx, 0.0, (KITTI_CX0 + 0.5) * sx - 0.5],
                [0.0, KITTI_FOCAL * sy, (KITTI_CY0 + 0.5) * sy - 0.5],
                [0.0, 0.0, 1.0],
            ]
        )

    @property
    def K_one_based(self) -> np.ndarray:
        """The intrinsics as KITTI writes them (principal point + 1)."""
        K1 = self.K.copy()
        K1[0, 2] += 1.0
        K1[1, 2] += 1.0
        return K1

    @property
    def R_rect_00(self) -> np.ndarray:
        # A small rectifying rotation (KITTI's is ~0.7°) so that code forgetting it is caught.
        return rotation_xyz(0.0043, -0.0074, -0.0098)

    @property
    def T_cam0_from_velo(self) -> np.ndarray:
        """``calib_velo_to_cam.txt``: (4, 4) unrectified cam0 ← Velodyne."""
        axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
        rotation = rotation_xyz(-0.0148, 0.0075, 0.0006) @ axes
        # Camera 0.27 m ahead of and 0.08 m below the Velodyne (camera height ~1.65 m).
        centre_in_velo = np.array([0.27, 0.0, -0.08])
        return make_transform(rotation, -rotation @ centre_in_velo)

    def P_rect(self, camera: int) -> np.ndarray:
        """(3, 4) KITTI projection matrix (1-based pixels) of rectified camera ``camera``."""
        translation = np.array([-CAMERA_CENTRES_X[camera], 0.0, 0.0])
        return self.K_one_based @ np.concatenate([np.eye(3), translation[:, None]], axis=1)

    def T_velo_from_camera(self, camera: int) -> np.ndarray:
        """(4, 4) pose of rectified camera ``camera`` in the Velodyne frame."""
        rect = make_transform(self.R_rect_00, np.zeros(3))
        rect0_from_velo = rect @ self.T_cam0_from_velo
        camera_in_rect0 = make_transform(np.eye(3), np.array([CAMERA_CENTRES_X[camera], 0.0, 0.0]))
        return np.linalg.inv(rect0_from_velo) @ camera_in_rect0


def _row(values: np.ndarray) -> str:
    return " ".join(f"{v:.12e}" for v in np.asarray(values, dtype=np.float64).ravel())


def cam_to_cam_text(rig: Rig) -> str:
    """``calib_cam_to_cam.txt`` in KITTI's format (undistorted: the images are rectified)."""
    lines = ["calib_time: 01-Jan-2000 00:00:00 (synthetic, distill-depth synth)", "corner_dist: 9.950000e-02"]
    size = np.array([rig.width, rig.height], dtype=np.float64)
    for camera in range(4):
        centre_rect0 = np.array([CAMERA_CENTRES_X[camera], 0.0, 0.0])
        # Unrectified camera i has cam0's orientation; X_i = R_0i · X_0 + T_0i.
        lines += [
            f"S_0{camera}: {_row(size)}",
            f"K_0{camera}: {_row(rig.K_one_based)}",
            f"D_0{camera}: {_row(np.zeros(5))}",
            f"R_0{camera}: {_row(np.eye(3))}",
            f"T_0{camera}: {_row(-rig.R_rect_00.T @ centre_rect0)}",
            f"S_rect_0{camera}: {_row(size)}",
            f"R_rect_0{camera}: {_row(rig.R_rect_00)}",
            f"P_rect_0{camera}: {_row(rig.P_rect(camera))}",
        ]
    return "\n".join(lines) + "\n"


def velo_to_cam_text(rig: Rig) -> str:
    transform = rig.T_cam0_from_velo
    return (
        "calib_time: 01-Jan-2000 00:00:00 (synthetic, distill-depth synth)\n"
        f"R: {_row(transform[:3, :3])}\n"
        f"T: {_row(transform[:3, 3])}\n"
        "delta_f: 0.000000e+00 0.000000e+00\n"
        "delta_c: 0.000000e+00 0.000000e+00\n"
    )


def write_calibration(date_dir: Path, rig: Rig) -> None:
    """Write both calibration files; an existing different calibration is an error (never overwritten)."""
    for name, text in (
        ("calib_cam_to_cam.txt", cam_to_cam_text(rig)),
        ("calib_velo_to_cam.txt", velo_to_cam_text(rig)),
    ):
        path = date_dir / name
        if path.exists():
            if path.read_text() != text:
                raise SynthError(
                    f"{path} exists with a different calibration (another --height/--width?); "
                    "choose another --out or --date"
                )
            continue
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text(text)
        tmp.replace(path)
