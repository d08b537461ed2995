"""Per-pixel region labels: one 8-bit bitmask per pixel, one bit per region (shared by synth, shards, evaluate).

A pixel may be in several regions (e.g. a moving car's window is MOVING | NO_RETURN). The label is
stored as an 8-bit grayscale PNG (``proj_depth/regions/image_0X/%010d.png`` in a synthetic KITTI
tree, ``regions.png`` in a shard sample); 0 means "in none of the regions".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MOVING = 1 << 0  # on an object that moves in the world (breaks branch U's static-world assumption)
TEXTURELESS = 1 << 1  # on a uniform-albedo façade or road patch (no photometric gradient)
NO_RETURN = 1 << 2  # on glass (car windows, façade windows) or very dark paint: LiDAR may not return
ABOVE_TOP_BEAM = 1 << 3  # surface point above the LiDAR's top beam elevation: never supervised by LiDAR
ON_LIDAR_ROW = 1 << 4  # a LiDAR beam's elevation passes through this pixel (within half a pixel)

REGION_BITS: dict[str, int] = {
    "moving": MOVING,
    "textureless": TEXTURELESS,
    "no_return": NO_RETURN,
    "above_top_beam": ABOVE_TOP_BEAM,
    "on_lidar_row": ON_LIDAR_ROW,
}

__all__ = ["MOVING", "TEXTURELESS", "NO_RETURN", "ABOVE_TOP_BEAM", "ON_LIDAR_ROW", "REGION_BITS", "region_mask",
           "regions_path", "resample_labels"]


def region_mask(labels: np.ndarray, name: str) -> np.ndarray:
    """Boolean mask (same shape as ``labels``, uint8 bitmask) of the pixels in region ``name``."""
    if name not in REGION_BITS:
        raise KeyError(f"unknown region {name!r}; known: {', '.join(REGION_BITS)}")
    return (np.asarray(labels) & REGION_BITS[name]) != 0


def regions_path(root: Path, drive_path: str, camera: int, frame: int) -> Path:
    """``proj_depth/regions/image_0X/%010d.png`` inside a (synthetic) drive folder, beside the ground truth."""
    return Path(root) / drive_path / "proj_depth" / "regions" / f"image_0{camera}" / f"{frame:010d}.png"


def resample_labels(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 bitmask → ``out_hw``, nearest pixel centre (bits are never blended)."""
    if labels.shape == tuple(out_hw):
        return labels
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    return np.asarray(image.resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST))
