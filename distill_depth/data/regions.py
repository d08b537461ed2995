"""Per-pixel region labels: one 8-bit bitmask per pixel, one bit per region (shared by synth, shards, evaluate).

A pixel may be in several regions (e.g. a moving car's window is MOVING | NO_RETURN). The label is
stored as an 8-bit grayscale PNG (``proj_depth/regions/image_0X/%010d.png`` in a synthetic KITTI
tree, ``regions.png`` in a shard sample); 0 means "in none of the regions".
"""

from __future__ import annotations

import numpy as np

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

__all__ = ["MOVING", "TEXTURELESS", "NO_RETURN", "ABOVE_TOP_BEAM", "ON_LIDAR_ROW", "REGION_BITS", "region_mask"]


def region_mask(labels: np.ndarray, name: str) -> np.ndarray:
    """Boolean mask (same shape as ``labels``, uint8 bitmask) of the pixels in region ``name``."""
    if name not in REGION_BITS:
        raise KeyError(f"unknown region {name!r}; known: {', '.join(REGION_BITS)}")
    return (np.asarray(labels) & REGION_BITS[name]) != 0
