"""Branch U: Monodepth2-style photometric reprojection, L_self and edge-aware smoothness (METHOD.md, "Branch U")."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_depth.losses.common import confidence_nll, finite, fp32, masked_mean, sanitize

SSIM_WINDOW = 3
"""SSIM window: 3×3 (Monodepth2's size), Gaussian (σ = 1.5, weights ≈ .31/.39/.31, kornia's window),
close to Monodepth2's 3×3 box; borders are reflect-padded."""

SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
SSIM_EPS = 1e-12
"""Constants of kornia.metrics.ssim at max_val = 1 (eps is added to the denominator): the map below
reproduces it exactly (tested against it), only computed more cheaply."""

LARGE_ERROR = 1e4
"""Penalty that makes the per-pixel minimum prefer a source whose warp stayed in the image; also the
error of a pixel with non-finite input (such pixels are masked out)."""


def _gaussian_taps(device: torch.device) -> Tensor:
    """The normalised 1-D Gaussian of the SSIM window, (SSIM_WINDOW,) fp32."""
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - SSIM_WINDOW // 2
    taps = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return taps / taps.sum()


def _local_means(maps: Tensor) -> Tensor:
    """Gaussian-window means of every channel of (B, C, H, W), reflect borders: the 2-D window is
    separable, so two 1-D depthwise passes (6 taps) replace one 3×3 pass (9 taps)."""
    channels = maps.shape[1]
    taps = _gaussian_taps(maps.device)
    pad = SSIM_WINDOW // 2
    x = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, SSIM_WINDOW), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, SSIM_WINDOW, 1), groups=channels)


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per pixel and channel, (B, C, H, W) ×2 → (B, C, H, W), images in [0, 1]; equals
    ``kornia.metrics.ssim(a, b, SSIM_WINDOW, max_val=1.0)``. The five local moments (a, b, a², b², ab)
    go through one grouped filter call instead of five."""
    c = a.shape[1]
    mu_a, mu_b, e_aa, e_bb, e_ab = _local_means(torch.cat([a, b, a * a, b * b, a * b], dim=1)).split(c, dim=1)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    num = (2.0 * mu_ab + SSIM_C1) * (2.0 * (e_ab - mu_ab) + SSIM_C2)
    den = (mu_aa + mu_bb + SSIM_C1) * ((e_aa - mu_aa) + (e_bb - mu_bb) + SSIM_C2)
    return num / (den + SSIM_EPS)


@fp32
def photometric_error(a: Tensor, b: Tensor, alpha: float = 0.85) -> Tensor:
    """pe(a, b) = α/2 · (1 − SSIM(a, b)) + (1 − α) · |a − b|, averaged over channels.

    a, b: (B, 3, H, W) in [0, 1] → (B, 1, H, W). Non-finite inputs give a large error (never NaN).
    """
    ok = finite(a, b)
    a = torch.where(ok, a, 0.0)
    b = torch.where(ok, b, 0.0)
    dssim = ((1.0 - ssim_map(a, b)) / 2.0).clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    l1 = (a - b).abs().mean(dim=1, keepdim=True)
    error = alpha * dssim + (1.0 - alpha) * l1
    return torch.where(ok, error, LARGE_ERROR)


def _pixel_min(maps: Sequence[Tensor]) -> Tensor:
    """Element-wise minimum of same-shape maps (no concatenation, no argmin: the gradient reaches
    the smallest map, as with a gather at the argmin)."""
    return functools.reduce(torch.minimum, maps)


@fp32
def identity_error(target: Tensor, sources: Sequence[Tensor], alpha: float = 0.85) -> Tensor:
    """min_k pe(I_t, I_k): the un-warped error of the auto-mask, (B, 1, H, W). It depends on neither the
    depth nor the pose, so compute it once per batch (not per scale) and without a graph."""
    with torch.no_grad():
        return _pixel_min([photometric_error(target, s, alpha) for s in sources])


@fp32
def photometric(
    target: Tensor,
    warped: Sequence[Tensor],
    warp_valid: Sequence[Tensor],
    sources: Sequence[Tensor] | None = None,
    alpha: float = 0.85,
    identity: Tensor | None = None,
    return_unmasked: bool = False,
) -> tuple[Tensor, ...]:
    """Per-pixel minimum reprojection error over sources, with Monodepth2 auto-masking.

        pe_min(p) = min_{k valid at p} pe(I_t, I_{k→t})(p)   (min over all k where none is valid)
        mask(p)   = pe_min(p) < min_k pe(I_t, I_k)(p)        (auto-mask)

    target: (B, 3, H, W) un-jittered target; warped[k]: source k warped into the target view
    (border padding); warp_valid[k]: (B, 1, H, W) bool, where the warp landed inside source k;
    sources[k]: the un-warped sources for auto-masking, or ``identity``: their precomputed
    :func:`identity_error` (reuse it across scales); neither disables auto-masking.
    A source whose warp left the image is used only when no source is valid at that pixel; then
    its border-padded error still counts (Monodepth2 keeps those pixels: masking them would cut
    the gradient that pulls a badly initialised depth back into view). Pixels where an un-warped
    source already matches better (static camera, objects moving with the camera) are excluded.
    Returns (pe_min (B, 1, H, W), mask (B, 1, H, W) bool); with ``return_unmasked`` also the
    minimum before auto-masking (LARGE_ERROR where an input pixel is not finite), the error a
    confidence can be trained against on the pixels auto-masking leaves out.
    """
    if len(warped) == 0 or len(warped) != len(warp_valid):
        raise ValueError(f"photometric: need one validity mask per warped source, got {len(warped)}/{len(warp_valid)}")
    errors = [photometric_error(target, image, alpha) for image in warped]
    valid_min = _pixel_min([torch.where(v, e, math.inf) for e, v in zip(errors, warp_valid)])
    pe_min = torch.where(valid_min < math.inf, valid_min, _pixel_min(errors))
    mask = pe_min < LARGE_ERROR  # non-finite input pixels carry LARGE_ERROR
    if identity is None and sources is not None and len(sources) > 0:
        identity = identity_error(target, sources, alpha)
    if identity is not None:
        mask = mask & (pe_min < identity)
    masked = torch.where(mask, pe_min, 0.0)
    return (masked, mask, pe_min) if return_unmasked else (masked, mask)


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
