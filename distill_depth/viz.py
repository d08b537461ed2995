"""Depth and confidence → RGB, and the one panel layout used by predict, evaluate and the tracker.

No plotting library: the colormaps are small anchor tables interpolated linearly, chosen so that
their luminance rises monotonically (a reader can order values from brightness alone).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Inverse-depth map: black → purple → red → orange → pale yellow (magma-like). Near = bright.
DEPTH_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
# Confidence map: dark blue → teal → green → yellow (viridis-like). Confident = bright.
CONFIDENCE_ANCHORS = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
DEPTH_PERCENTILES = (5.0, 95.0)
"""Per-image percentiles of inverse depth mapped to the two ends of the depth colormap."""
GT_MISSING_RGB = (0, 0, 0)


def _table(anchors: np.ndarray, size: int = 256) -> np.ndarray:
    x = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, size)
    channels = [np.interp(t, x, anchors[:, c]) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=1)), 0, 255).astype(np.uint8)


DEPTH_COLORMAP = _table(DEPTH_ANCHORS)
"""``(256, 3)`` uint8 lookup table of the depth colormap (index 255 = nearest)."""
CONFIDENCE_COLORMAP = _table(CONFIDENCE_ANCHORS)
"""``(256, 3)`` uint8 lookup table of the confidence colormap (index 255 = confidence 1)."""


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 relative luminance of uint8/float RGB (last axis), for monotonicity checks."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def apply_colormap(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB (shape + (3,)) through a ``(N, 3)`` table."""
    index = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(table) - 1)).astype(np.int64)
    return table[index]


def _as_numpy(maps: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = maps.detach().float().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps, np.float32)
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (B, 1, H, W), got {tuple(array.shape)}")
    return array[:, 0]


def colorize_depth(
    depth: Tensor | np.ndarray, percentiles: tuple[float, float] = DEPTH_PERCENTILES
) -> np.ndarray:
    """``(B, 1, H, W)`` depth in metres → ``(B, H, W, 3)`` uint8, inverse depth colormapped.

    Each image is normalised on its own: the ``percentiles`` of its inverse depth over pixels with
    depth > 0 map to the dark and bright ends (near objects are bright, the sky dark). Pixels
    with depth <= 0 (no value) are black.
    """
    array = _as_numpy(depth, "depth")
    out = np.zeros(array.shape + (3,), dtype=np.uint8)
    for i, image in enumerate(array):
        has_value = np.isfinite(image) & (image > 0)
        if not has_value.any():
            continue
        inverse = np.zeros_like(image, dtype=np.float64)
        inverse[has_value] = 1.0 / image[has_value]
        low, high = np.percentile(inverse[has_value], percentiles)
        scaled = (inverse - low) / max(high - low, 1e-12)
        rgb = apply_colormap(scaled, DEPTH_COLORMAP)
        rgb[~has_value] = GT_MISSING_RGB
        out[i] = rgb
    return out


def colorize_confidence(confidence: Tensor | np.ndarray) -> np.ndarray:
    """``(B, 1, H, W)`` confidence in [0, 1] → ``(B, H, W, 3)`` uint8 on a FIXED 0..1 scale.

    No per-image normalisation, so the colours of two images or two branches compare directly.
    """
    return apply_colormap(_as_numpy(confidence, "confidence"), CONFIDENCE_COLORMAP)


def image_to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """``(B, 3, H, W)`` float image in [0, 1] → ``(B, H, W, 3)`` uint8."""
    array = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"image: expected shape (B, 3, H, W), got {tuple(array.shape)}")
    return np.rint(np.clip(array.transpose(0, 2, 3, 1), 0.0, 1.0) * 255).astype(np.uint8)


def side_by_side(
    image: Tensor | np.ndarray | None = None,
    depth: Tensor | np.ndarray | None = None,
    confidence: Tensor | np.ndarray | None = None,
    gt_depth: Tensor | np.ndarray | None = None,
    *,
    gap: int = 2,
) -> np.ndarray:
    """The panels that are given, left to right: image | depth | confidence | ground truth.

    image ``(B, 3, H, W)`` in [0, 1]; depth, confidence, gt_depth ``(B, 1, H, W)`` (all the same
    H, W). Returns ``(B, H, W_total, 3)`` uint8 with ``gap`` white columns between panels: one
    picture per sample, ready for PIL, ``wandb.Image`` or TensorBoard (``dataformats="HWC"``).
    """
    panels = []
    if image is not None:
        panels.append(image_to_uint8(image))
    if depth is not None:
        panels.append(colorize_depth(depth))
    if confidence is not None:
        panels.append(colorize_confidence(confidence))
    if gt_depth is not None:
        panels.append(colorize_depth(gt_depth))
    if not panels:
        raise ValueError("side_by_side needs at least one of image, depth, confidence, gt_depth")
    return join_panels(panels, gap=gap)


def join_panels(panels: list[np.ndarray], *, gap: int = 2) -> np.ndarray:
    """``(B, H, W_k, 3)`` uint8 pictures, left to right, ``gap`` white columns between them."""
    shapes = {p.shape[:3] for p in panels}
    if len(shapes) != 1:
        raise ValueError(f"side_by_side: panels differ in (B, H, W): {sorted(shapes)}")
    batch, height, _ = panels[0].shape[:3]
    spacer = np.full((batch, height, gap, 3), 255, dtype=np.uint8)
    pieces = []
    for k, panel in enumerate(panels):
        if k and gap > 0:
            pieces.append(spacer)
        pieces.append(panel)
    return np.concatenate(pieces, axis=2)


def to_tensor_chw(pictures: np.ndarray) -> Tensor:
    """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float in [0, 1] (for trackers that want CHW)."""
    return torch.from_numpy(np.ascontiguousarray(pictures)).permute(0, 3, 1, 2).float() / 255.0
