"""The evaluation protocols, stated in one place, and how a prediction is prepared for one.

| protocol          | ground truth (shard entry)          | crop      | depth range  |
|-------------------|-------------------------------------|-----------|--------------|
| `eigen`           | raw projected LiDAR (`depth.png`)   | Garg      | 1e-3 .. 80 m |
| `eigen_benchmark` | improved ground truth (`gt.png`)    | none      | 1e-3 .. 80 m |
| `dense`           | synthetic exact depth (`gt.png`)    | none      | 1e-3 .. 80 m |
| `cityscapes`      | depth from disparity (`gt.png`)     | centre    | 1e-3 .. 80 m |

The `cityscapes` centre crop is ManyDepth's: rows 256..768 and columns 192..1856 of the
full-resolution frame (2048×1024). The shards' frames have already lost their bottom quarter
(rows 768..1024, the ego car), which leaves row numbers unchanged, so on the 768×2048 ground
truth (``make-shards --gt-full-res``) it is rows 256..768 = the bottom two thirds, columns
192..1856; at any other ground-truth size the same fractions (rows ⌊H/3⌋..H, columns
⌊192·W/2048⌋..⌊1856·W/2048⌋).

Order of operations per image (as in the reference KITTI evaluation): resize the prediction to
the ground truth's size (bilinear on depth) → median scaling if on (ratio over the evaluated
pixels) → clamp to the range → metrics over the evaluated pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from distill_depth.evaluation.inference import resize_map
from distill_depth.metrics import MAX_EVAL_DEPTH, MIN_EVAL_DEPTH, garg_crop_mask, median_scale, range_mask
from distill_depth.types import Batch


class EvaluationError(ValueError):
    """Evaluation input is unusable (missing ground truth, unknown protocol...); says which."""


@dataclass(frozen=True)
class Protocol:
    name: str
    ground_truth: Literal["sparse_depth", "gt_depth"]
    """Batch field holding the ground truth: ``sparse_depth`` (``depth.png``) or ``gt_depth`` (``gt.png``)."""
    garg_crop: bool
    centre_crop: bool = False
    """Cityscapes' centre crop (ManyDepth), see :func:`cityscapes_crop_mask`."""
    min_depth: float = MIN_EVAL_DEPTH
    max_depth: float = MAX_EVAL_DEPTH

    def describe(self) -> dict:
        described = {
            "name": self.name,
            "ground_truth": {"sparse_depth": "depth.png", "gt_depth": "gt.png"}[self.ground_truth],
            "garg_crop": self.garg_crop,
            "min_depth": self.min_depth,
            "max_depth": self.max_depth,
        }
        if self.centre_crop:
            described["centre_crop"] = CITYSCAPES_CROP_TEXT
        return described


PROTOCOLS: dict[str, Protocol] = {
    "eigen": Protocol("eigen", ground_truth="sparse_depth", garg_crop=True),
    "eigen_benchmark": Protocol("eigen_benchmark", ground_truth="gt_depth", garg_crop=False),
    "dense": Protocol("dense", ground_truth="gt_depth", garg_crop=False),
    "cityscapes": Protocol("cityscapes", ground_truth="gt_depth", garg_crop=False, centre_crop=True),
}
CITYSCAPES_FULL_HW = (768, 2048)
"""Cityscapes frame after the ego-car crop (1024×2048 less its bottom quarter)."""
CITYSCAPES_CROP = (256, 768, 192, 1856)
"""Rows and columns (top, bottom, left, right; end exclusive) evaluated at ``CITYSCAPES_FULL_HW``."""
CITYSCAPES_CROP_TEXT = "rows 256..768, cols 192..1856 of the 768x2048 cropped frame (scaled to the gt size)"


def cityscapes_crop_mask(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``(H, W)`` bool, True inside ManyDepth's Cityscapes crop scaled to a ``H × W`` ground truth."""
    (full_h, full_w), (top, bottom, left, right) = CITYSCAPES_FULL_HW, CITYSCAPES_CROP
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[top * height // full_h : bottom * height // full_h, left * width // full_w : right * width // full_w] = True
    return mask


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def ground_truth(batch: Batch, protocol: Protocol) -> Tensor:
    """``(B, 1, H, W)`` ground truth of the protocol, or an error naming the missing shard entry."""
    gt = getattr(batch, protocol.ground_truth)
    if gt is None:
        entry = protocol.describe()["ground_truth"]
        raise EvaluationError(
            f"protocol {protocol.name!r} needs {entry} in every sample, but samples {batch.keys[:3]} have none "
            "(build the shards from a tree with proj_depth/groundtruth, or use --protocol eigen)"
        )
    return gt.float()


def evaluation_mask(gt: Tensor, protocol: Protocol) -> Tensor:
    """``(B, 1, H, W)`` bool: ground truth inside the depth range (and the Garg / Cityscapes crop)."""
    mask = range_mask(gt, protocol.min_depth, protocol.max_depth)
    if protocol.garg_crop:
        mask = mask & garg_crop_mask(gt.shape[-2], gt.shape[-1], device=gt.device)
    if protocol.centre_crop:
        mask = mask & cityscapes_crop_mask(gt.shape[-2], gt.shape[-1], device=gt.device)
    return mask


def prepare_prediction(
    depth: Tensor, gt: Tensor, mask: Tensor, protocol: Protocol, *, median_scaling: bool
) -> tuple[Tensor, Tensor]:
    """The final depth the metrics see, ``(B, 1, H_gt, W_gt)``, and the scale ratio ``(B,)``.

    Resized to the ground truth (bilinear), median-scaled over ``mask`` if asked (ratio 1
    otherwise), clamped to ``[min_depth, max_depth]``.
    """
    depth = resize_map(depth.float(), tuple(gt.shape[-2:]))
    if median_scaling:
        depth, ratio = median_scale(depth, gt, mask)
    else:
        ratio = torch.ones(depth.shape[0], dtype=torch.float64, device=depth.device)
    return depth.clamp(protocol.min_depth, protocol.max_depth), ratio
