"""Cityscapes in its official layout: frame names, camera JSON, disparity, the ego-car crop.

Layout (one split ``SPLIT`` = train | val | test, city ``CITY``, frame name ``CITY_SEQ_FRAME``)::

    leftImg8bit_sequence/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png    (30-frame snippets, 17 Hz)
    rightImg8bit_sequence/SPLIT/CITY/CITY_SEQ_FRAME_rightImg8bit.png  (stereo partner, optional)
    camera/SPLIT/CITY/CITY_SEQ_FRAME_camera.json      (annotated frames only; one per snippet)
    disparity/SPLIT/CITY/CITY_SEQ_FRAME_disparity.png (annotated frames only; uint16, see below)

Disparity PNG: ``p > 0`` → disparity ``(p − 1) / 256`` pixels, ``p = 0`` invalid; depth =
``baseline · fx / disparity`` with fx at the disparity's (native) resolution. The intrinsics
``u0, v0`` are read as 0-based pixel-centre coordinates (the project's convention, see
``kitti``), so a resize by ``s`` maps ``c → (c + 0.5)·s − 0.5``. The bottom quarter of every
frame (the ego car's bonnet) is cut off before anything else (rows ``[0, ⌊3H/4⌋)`` are kept), which
leaves K unchanged: the crop removes rows below the origin only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distill_depth.data.kitti import read_image, read_png16

SPLITS = ("train", "val", "test")
DISPARITY_SCALE = 256.0
FRAME_NAME = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")
"""``CITY_SEQ_FRAME``; CITY may itself hold underscores (the demo videos' ``stuttgart_01``)."""


class CityscapesDataError(ValueError):
    """A Cityscapes file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True, order=True)
class Frame:
    """One frame of a snippet: ``split/city/city_seq_frame``."""

    split: str
    city: str
    seq: int
    frame: int

    @property
    def name(self) -> str:
        return f"{self.city}_{self.seq:06d}_{self.frame:06d}"

    @property
    def key(self) -> str:
        """Shard sample key (no dots): ``CITY_SEQ_FRAME``."""
        return self.name.replace(".", "_")

    def offset(self, delta: int) -> "Frame":
        return Frame(self.split, self.city, self.seq, self.frame + delta)


def parse_frame_name(name: str, split: str, where: str) -> Frame:
    match = FRAME_NAME.match(name)
    if not match:
        raise CityscapesDataError(f"{where}: {name!r} is not a Cityscapes frame name CITY_SEQ_FRAME "
                                  "(e.g. aachen_000000_000019)")
    return Frame(split, match["city"], int(match["seq"]), int(match["frame"]))


def left_path(root: Path, frame: Frame) -> Path:
    return Path(root) / "leftImg8bit_sequence" / frame.split / frame.city / f"{frame.name}_leftImg8bit.png"


def right_path(root: Path, frame: Frame) -> Path:
    return Path(root) / "rightImg8bit_sequence" / frame.split / frame.city / f"{frame.name}_rightImg8bit.png"


def camera_path(root: Path, frame: Frame) -> Path:
    return Path(root) / "camera" / frame.split / frame.city / f"{frame.name}_camera.json"


def disparity_path(root: Path, frame: Frame) -> Path:
    return Path(root) / "disparity" / frame.split / frame.city / f"{frame.name}_disparity.png"


# ---------------------------------------------------------------------------------------------
# camera JSON


@dataclass(frozen=True)
class Camera:
    """Intrinsics (native resolution, 0-based pixel centres) and stereo baseline in metres."""

    fx: float
    fy: float
    u0: float
    v0: float
    baseline: float

    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.u0], [0.0, self.fy, self.v0], [0.0, 0.0, 1.0]])


_OFFICIAL = {("intrinsic", "fx"), ("intrinsic", "fy"), ("intrinsic", "u0"), ("intrinsic", "v0"),
             ("extrinsic", "baseline")}


def read_camera(path: str | Path) -> Camera:
    """Parse an official ``*_camera.json`` (``intrinsic.fx/fy/u0/v0``, ``extrinsic.baseline``).

    A flattened file (the same numbers at the top level, as some re-packaged copies have) is an
    error that says so: the official archives never hold one, and guessing a layout would hide a
    tree that is not what the rest of the converter expects.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CityscapesDataError(f"{path}: camera JSON not found (from camera_trainvaltest.zip)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CityscapesDataError(f"{path}: unreadable camera JSON ({error})") from None
    if not isinstance(data, dict):
        raise CityscapesDataError(f"{path}: camera JSON must be an object")
    missing = [f"{group}.{key}" for group, key in sorted(_OFFICIAL)
               if not isinstance(data.get(group), dict) or key not in data[group]]
    if missing:
        flat = {key for _, key in _OFFICIAL} <= set(data)
        hint = (" (this is a flattened layout with fx/fy/u0/v0/baseline at the top level, not the official "
                "camera_trainvaltest layout)") if flat else ""
        raise CityscapesDataError(f"{path}: camera JSON lacks {', '.join(missing)}{hint}")
    values = {}
    for group, key in _OFFICIAL:
        value = data[group][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise CityscapesDataError(f"{path}: {group}.{key} must be a finite number, got {value!r}")
        values[key] = float(value)
    for key in ("fx", "fy", "baseline"):
        if values[key] <= 0:
            raise CityscapesDataError(f"{path}: {key} must be > 0, got {values[key]!r}")
    return Camera(values["fx"], values["fy"], values["u0"], values["v0"], values["baseline"])


# ---------------------------------------------------------------------------------------------
# images, disparity, crop


def read_rgb(path: str | Path) -> Image.Image:
    """RGB image, fully decoded; missing or corrupt → ``KittiDataError`` naming the file."""
    return read_image(path)


def read_disparity(path: str | Path) -> np.ndarray:
    """``(H, W)`` float64 disparity in pixels from the uint16 PNG; 0 where invalid (p = 0)."""
    raw = read_png16(path, "disparity PNG").astype(np.float64)
    return np.where(raw > 0, (raw - 1.0) / DISPARITY_SCALE, 0.0)


def encode_disparity(disparity: np.ndarray) -> np.ndarray:
    """``(H, W)`` disparity in pixels (0 = invalid) → uint16 ``p = round(256·d) + 1`` (``p = 0`` invalid)."""
    disparity = np.asarray(disparity, dtype=np.float64)
    p = np.clip(np.round(disparity * DISPARITY_SCALE) + 1.0, 1, 65535)
    return np.where(disparity > 0, p, 0).astype(np.uint16)


def depth_from_disparity(disparity: np.ndarray, camera: Camera) -> np.ndarray:
    """``(H, W)`` float64 metres ``baseline · fx / d`` where ``d > 0``, else 0."""
    with np.errstate(divide="ignore"):
        return np.where(disparity > 0, camera.baseline * camera.fx / np.where(disparity > 0, disparity, 1.0), 0.0)


def kept_rows(height: int) -> int:
    """Rows kept by the ego-car crop: the top ``⌊3H/4⌋`` (768 of 1024)."""
    return (3 * height) // 4


def crop_ego_car(image: Image.Image) -> Image.Image:
    width, height = image.size
    return image.crop((0, 0, width, kept_rows(height)))


def intrinsics(camera: Camera, cropped_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """``(3, 3)`` K of the cropped frame ``cropped_hw`` resized to ``out_hw`` (0-based pixel centres)."""
    (h0, w0), (h1, w1) = cropped_hw, out_hw
    sx, sy = w1 / w0, h1 / h0
    K = camera.K()
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


# ---------------------------------------------------------------------------------------------
# split files


def read_split_file(path: str | Path) -> list[tuple[str, str, int]]:
    """ManyDepth's test-list format, ``CITY CITY_SEQ_FRAME`` per line → ``(city, name, line number)``."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise CityscapesDataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CityscapesDataError(f"{path}: cannot read split file ({error})") from None
    rows = []
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not FRAME_NAME.match(fields[1]) or FRAME_NAME.match(fields[1])["city"] != fields[0]:
            raise CityscapesDataError(f"{path}:{line_no}: expected 'CITY CITY_SEQ_FRAME', got {line.strip()!r}")
        rows.append((fields[0], fields[1], line_no))
    if not rows:
        raise CityscapesDataError(f"{path}: split file lists no frame")
    return rows
