"""Branch S: confidence-weighted LiDAR loss L_sup' and point filtering L_pf (METHOD.md, "Branch S")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from distill_depth.losses.common import confidence_nll, finite, fp32, masked_mean, sanitize
from distill_depth.losses.distill import median_scale

Rho = Literal["log", "l1"]
PointFiltering = Literal["held_out", "prior", "none"]


@fp32
def lidar_mask(sparse_depth: Tensor) -> Tensor:
    """Ω: (B, 1, H, W) bool, pixels with a finite LiDAR depth > 0."""
    return torch.isfinite(sparse_depth) & (sparse_depth > 0)


@fp32
def depth_error(depth: Tensor, target: Tensor, rho: Rho = "log") -> Tensor:
    """Per-pixel error ρ, (B, 1, H, W): |log D − log D*| (``log``) or |D − D*| in metres (``l1``).

    Pixels where either depth is not a finite positive number get ρ = 0 (callers mask them out).
    """
    ok = finite(depth, target) & (depth > 0) & (target > 0)
    depth = sanitize(depth, ok, 1.0)
    target = sanitize(target, ok, 1.0)
    if rho == "log":
        error = (torch.log(depth) - torch.log(target)).abs()
    elif rho == "l1":
        error = (depth - target).abs()
    else:
        raise ValueError(f"loss.rho: {rho!r} is not one of ['log', 'l1']")
    return torch.where(ok, error, torch.zeros_like(error))


@fp32
def sup_confidence_nll(
    depth: Tensor, confidence: Tensor, sparse_depth: Tensor, mask: Tensor, tau: float, rho: Rho = "log"
) -> Tensor:
    """L_sup' = mean_{p in Ω ∩ mask} [ C_s(p) · ρ(D_s(p), D*(p)) / τ_s − log C_s(p) ].

    depth, confidence, sparse_depth: (B, 1, H, W); mask: (B, 1, H, W) bool, the LiDAR pixels fitted
    this step (Ω minus the held-out ones). Gradients reach depth and confidence. A batch without
    LiDAR pixels gives 0. Single scale: the branch averages it over its upsampled scales.
    """
    mask = mask & lidar_mask(sparse_depth) & finite(depth) & (depth > 0)
    return confidence_nll(depth_error(depth, sparse_depth, rho), confidence, mask, tau)


def split_held_out(lidar: Tensor, fraction: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Split Ω (B, 1, H, W) bool into (fit, held_out): each LiDAR pixel is held out with probability M."""
    if fraction <= 0:
        return lidar, torch.zeros_like(lidar)
    draw = torch.rand(lidar.shape, device=lidar.device, generator=generator)
    held = lidar & (draw < fraction)
    return lidar & ~held, held


@fp32
def point_filtering_held_out(
    depth: Tensor, confidence: Tensor, sparse_depth: Tensor, held_out: Tensor, tau: float, rho: Rho = "log"
) -> Tensor:
    """L_pf (``held_out``) = mean_{p in Ω_held} [ C_s(p) · sg(ρ(p)) / τ_s − log C_s(p) ].

    Only the confidence is trained on the held-out LiDAR pixels (the error is detached), so it
    learns what the error looks like where the depth was not fit. Shapes (B, 1, H, W).
    """
    mask = held_out & lidar_mask(sparse_depth) & finite(depth) & (depth > 0)
    error = depth_error(depth.detach(), sparse_depth, rho)
    return confidence_nll(error, confidence, mask, tau)


@fp32
def point_filtering_prior(confidence: Tensor, sparse_depth: Tensor, prior: float, valid: Tensor | None = None) -> Tensor:
    """L_pf (``prior``) = mean_{p in Ω̄} |C_s(p) − M|: confidence away from LiDAR pulled toward M.

    ``valid`` (B, 1, H, W) bool optionally restricts Ω̄ to pixels of the real image (not padding).
    """
    mask = ~lidar_mask(sparse_depth) & finite(confidence)
    if valid is not None:
        mask = mask & valid
    confidence = sanitize(confidence, mask, prior)
    return masked_mean((confidence - prior).abs(), mask)


@fp32
def lidar_confidence_nll(
    depth: Tensor, confidence: Tensor, sparse_depth: Tensor, tau: float, rho: Rho = "log", align_scale: bool = False
) -> Tensor:
    """U's confidence on S's scale (``loss.u_confidence_target: lidar``):

        L_conf = mean_{p in Ω} [ C_u(p) · sg(ρ(k·D_u(p), D*(p))) / τ_s − log C_u(p) ]

    k = median(D*)/median(D_u) over each image's LiDAR pixels when ``align_scale`` (U without
    metric scale), else 1. Only the confidence learns: U's depth never fits the LiDAR, so its
    error at every LiDAR pixel is what its error looks like anywhere, the quantity S's held-out
    points teach C_s. Both confidences then estimate min(1, τ_s/ρ) and can be compared pixel by
    pixel. Shapes (B, 1, H, W); an image without LiDAR contributes nothing.
    """
    lidar = lidar_mask(sparse_depth)
    depth = depth.detach()
    if align_scale:
        depth = depth * median_scale(sparse_depth, depth, lidar)
    return point_filtering_held_out(depth, confidence, sparse_depth, lidar, tau, rho)


def point_filtering(
    variant: PointFiltering,
    depth: Tensor,
    confidence: Tensor,
    sparse_depth: Tensor,
    held_out: Tensor,
    tau: float,
    fraction: float,
    rho: Rho = "log",
    valid: Tensor | None = None,
) -> Tensor:
    """L_pf of the configured variant (``loss.point_filtering``): ``held_out`` (default), ``prior``
    (M = ``fraction`` is the prior confidence), or ``none`` (0, the ablation)."""
    if variant == "held_out":
        return point_filtering_held_out(depth, confidence, sparse_depth, held_out, tau, rho)
    if variant == "prior":
        return point_filtering_prior(confidence, sparse_depth, fraction, valid)
    if variant == "none":
        return torch.zeros((), dtype=torch.float32, device=confidence.device)
    raise ValueError(f"loss.point_filtering: {variant!r} is not one of ['held_out', 'prior', 'none']")
