"""Shared numerics of the losses: fp32 under autocast, masked means, safe logs."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

CONFIDENCE_EPS = 1e-6
"""Confidence is clamped to [eps, 1 - eps] inside -log C so C = 0 or 1 stays finite."""

Fn = TypeVar("Fn", bound=Callable[..., Any])


def _float(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_float(v) for v in value)
    return value


def _device_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            return value[0].device.type
    return "cpu"


def fp32(fn: Fn) -> Fn:
    """Run ``fn`` with autocast disabled and every floating tensor argument cast to fp32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=_device_type(args, kwargs), enabled=False):
            return fn(*_float(args), **{k: _float(v) for k, v in kwargs.items()})

    wrapper.fp32_body = fn  # what train.compile compiles (train/speed.py says why)
    return wrapper  # type: ignore[return-value]


def finite(*tensors: Tensor) -> Tensor:
    """Bool mask of pixels where every tensor is finite (broadcast over channels with all())."""
    mask = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok = torch.isfinite(t)
        if ok.dim() == 4 and ok.shape[1] > 1:
            ok = ok.all(dim=1, keepdim=True)
        mask = mask & ok
    return mask


def sanitize(values: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``values`` where ``mask`` else ``fill``: later ops (log, division) never see NaN/inf/0, so no NaN
    gradient leaks through a masked-out pixel."""
    return torch.where(mask, values, torch.full_like(values, fill))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (broadcast); 0 (still attached to the graph) when the mask is empty."""
    mask = mask.expand_as(values)
    picked = torch.where(mask, values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp(min=1)


def safe_confidence(confidence: Tensor) -> Tensor:
    """Confidence clamped to [eps, 1 - eps]: −log C is finite at C = 0, and C = 1 is reachable in the limit."""
    return confidence.clamp(CONFIDENCE_EPS, 1.0 - CONFIDENCE_EPS)


def confidence_nll(error: Tensor, confidence: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Laplacian negative log-likelihood with confidence c = 1/b, averaged over ``mask``:

        L = mean_{p in mask} [ C(p) · e(p) / τ − log C(p) ]

    Its minimiser over C for a fixed error e is C = min(1, τ / e). Shapes (B, 1, H, W); fp32.
    """
    mask = mask & finite(error, confidence)
    error = sanitize(error, mask, 0.0)
    confidence = safe_confidence(sanitize(confidence, mask, 1.0))
    return masked_mean(confidence * error / tau - torch.log(confidence), mask)


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a (B, C, h, w) map to ``size`` (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
