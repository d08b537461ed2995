"""The loss terms of METHOD.md, one function each; every one runs in fp32 even under autocast."""

from distill_depth.losses.common import confidence_nll, masked_mean, upsample
from distill_depth.losses.distill import (
    aligns_u_scale,
    distill,
    distill_ramp,
    lidar_coverage,
    lidar_trust,
    median_scale,
    most_confident,
    reprojects_better,
)
from distill_depth.losses.photometric import (
    identity_error,
    photometric,
    photometric_error,
    self_confidence_nll,
    smoothness,
    ssim_map,
)
from distill_depth.losses.supervised import (
    depth_error,
    lidar_confidence_nll,
    lidar_mask,
    point_filtering,
    point_filtering_held_out,
    point_filtering_prior,
    split_held_out,
    sup_confidence_nll,
)

__all__ = [
    "aligns_u_scale",
    "confidence_nll",
    "depth_error",
    "distill",
    "distill_ramp",
    "lidar_confidence_nll",
    "lidar_coverage",
    "lidar_trust",
    "identity_error",
    "lidar_mask",
    "masked_mean",
    "median_scale",
    "photometric",
    "photometric_error",
    "point_filtering",
    "point_filtering_held_out",
    "point_filtering_prior",
    "most_confident",
    "reprojects_better",
    "self_confidence_nll",
    "smoothness",
    "split_held_out",
    "ssim_map",
    "sup_confidence_nll",
    "upsample",
]
