"""Branch U: Monodepth2-style photometric reprojection, L_self and edge-aware smoothness (METHOD.md, "Branch U")."""

from __future__ import annotations

from collections.abc import Sequence

import kornia
import torch
from torch import Tensor

from distill_depth.losses.common import confidence_nll, finite, fp32, masked_mean, sanitize

SSIM_WINDOW = 3
"""SSIM window: 3×3 (Monodepth2's size). kornia's window is Gaussian (σ = 1.5, weights ≈ .31/.39/.31),
close to Monodepth2's 3×3 box; borders are reflect-padded."""

LARGE_ERROR = 1e4
"""Penalty that makes the per-pixel minimum prefer a source whose warp stayed in the image; also the
error of a pixel with non-finite input (such pixels are masked out)."""


@fp32
def photometric_error(a: Tensor, b: Tensor, alpha: float = 0.85) -> Tensor:
    """pe(a, b) = α/2 · (1 − SSIM(a, b)) + (1 − α) · |a − b|, averaged over channels.

    a, b: (B, 3, H, W) in [0, 1] → (B, 1, H, W). Non-finite inputs give a large error (never NaN).
    """
    ok = finite(a, b)
    a = sanitize(a, ok, 0.0)
    b = sanitize(b, ok, 0.0)
    ssim = kornia.metrics.ssim(a, b, window_size=SSIM_WINDOW, max_val=1.0)
    dssim = ((1.0 - ssim) / 2.0).clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    l1 = (a - b).abs().mean(dim=1, keepdim=True)
    error = alpha * dssim + (1.0 - alpha) * l1
    return torch.where(ok, error, torch.full_like(error, LARGE_ERROR))


@fp32
def photometric(
    target: Tensor,
    warped: Sequence[Tensor],
    warp_valid: Sequence[Tensor],
    sources: Sequence[Tensor] | None = None,
    alpha: float = 0.85,
) -> tuple[Tensor, Tensor]:
    """Per-pixel minimum reprojection error over sources, with Monodepth2 auto-masking.

        pe_min(p) = pe(I_t, I_{k*→t})(p),  k* = argmin_k [ pe(I_t, I_{k→t})(p) + LARGE · ¬valid_k(p) ]
        mask(p)   = pe_min(p) < min_k pe(I_t, I_k)(p)                       (auto-mask)

    target: (B, 3, H, W) un-jittered target; warped[k]: source k warped into the target view
    (border padding); warp_valid[k]: (B, 1, H, W) bool, where the warp landed inside source k;
    sources[k]: the un-warped sources for auto-masking (``None`` disables it).
    A source whose warp left the image is used only when no source is valid at that pixel; then
    its border-padded error still counts (Monodepth2 keeps those pixels: masking them would cut
    the gradient that pulls a badly initialised depth back into view). Pixels where an un-warped
    source already matches better (static camera, objects moving with the camera) are excluded.
    Returns (pe_min (B, 1, H, W), mask (B, 1, H, W) bool).
    """
    if len(warped) == 0 or len(warped) != len(warp_valid):
        raise ValueError(f"photometric: need one validity mask per warped source, got {len(warped)}/{len(warp_valid)}")
    errors = torch.cat([photometric_error(target, image, alpha) for image in warped], dim=1)
    invalid = ~torch.cat(list(warp_valid), dim=1)
    choice = (errors + LARGE_ERROR * invalid.float()).detach().argmin(dim=1, keepdim=True)
    pe_min = errors.gather(1, choice)
    mask = pe_min < LARGE_ERROR  # non-finite input pixels carry LARGE_ERROR
    if sources is not None and len(sources) > 0:
        identity = torch.cat([photometric_error(target, s, alpha) for s in sources], dim=1)
        mask = mask & (pe_min < identity.min(dim=1, keepdim=True).values)
    pe_min = torch.where(mask, pe_min, torch.zeros_like(pe_min))
    return pe_min, mask


@fp32
def self_confidence_nll(pe_min: Tensor, confidence: Tensor, mask: Tensor, tau: float) -> Tensor:
    """L_self (photometric part) = mean_{p in mask} [ C_u(p) · pe_min(p) / τ_u − log C_u(p) ].

    pe_min, confidence: (B, 1, H, W); mask from :func:`photometric`. The optimum is C = min(1, τ_u/pe).
    Single scale: the branch averages it over its upsampled scales.
    """
    return confidence_nll(pe_min, confidence, mask, tau)


@fp32
def smoothness(disp: Tensor, image: Tensor) -> Tensor:
    """Edge-aware smoothness of mean-normalised disparity d' = d / mean(d) (per image):

        L_smooth = mean |∂x d'| · exp(−|∂x I|) + mean |∂y d'| · exp(−|∂y I|)

    disp: (B, 1, h, w); image: (B, 3, h, w) at the same resolution (|∂I| averaged over channels).
    Non-finite pixels drop out of the means.
    """
    ok = finite(disp, image)
    disp = sanitize(disp, ok, 0.0)
    image = sanitize(image, ok, 0.0)
    count = ok.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1)
    mean = (disp.sum(dim=(1, 2, 3), keepdim=True) / count).clamp(min=1e-7)
    norm = disp / mean
    dx_d = (norm[..., :, :-1] - norm[..., :, 1:]).abs()
    dy_d = (norm[..., :-1, :] - norm[..., 1:, :]).abs()
    dx_i = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(dim=1, keepdim=True)
    dy_i = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(dim=1, keepdim=True)
    ok_x = ok[..., :, :-1] & ok[..., :, 1:]
    ok_y = ok[..., :-1, :] & ok[..., 1:, :]
    return masked_mean(dx_d * torch.exp(-dx_i), ok_x) + masked_mean(dy_d * torch.exp(-dy_i), ok_y)
