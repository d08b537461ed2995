"""Standard monocular-depth metrics and the KITTI protocol helpers (masks, median scaling, AUSE).

Everything works on batched tensors ``(B, 1, H, W)`` and returns per-image values ``(B,)``: the
standard protocol averages metrics per image first, then over images (Eigen et al. 2014).
Arithmetic runs in float64 so that results do not depend on the input dtype or the batch size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
"""Keys of :func:`depth_metrics`: AbsRel, SqRel, RMSE, RMSElog, δ<1.25, δ<1.25², δ<1.25³."""

LOWER_IS_BETTER = {
    "abs_rel": True, "sq_rel": True, "rmse": True, "rmse_log": True, "a1": False, "a2": False, "a3": False,
}

MIN_EVAL_DEPTH = 1e-3
"""Lower end of the evaluated depth range, metres (KITTI standard)."""
MAX_EVAL_DEPTH = 80.0
"""Upper end of the evaluated depth range, metres (KITTI standard)."""

GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
"""Garg et al. (2016) crop as fractions of the ground truth's (top, bottom, left, right)."""

SparsificationError = Literal["abs_rel", "rmse"]


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[1] != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected equal shapes (B, 1, H, W), got {shapes}")


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Per-image standard depth metrics over the ``valid`` pixels of each image.

    pred, gt: ``(B, 1, H, W)`` depth in metres (the evaluator clamps pred to the protocol range
    first; a prediction <= 0 counts as 1e-12 m). valid: ``(B, 1, H, W)`` bool; pixels with gt <= 0
    are never counted.
    Returns ``{name: (B,) float64}`` for every name in :data:`METRIC_NAMES`:
        abs_rel  = mean |d - d*| / d*          sq_rel   = mean (d - d*)² / d*
        rmse     = sqrt(mean (d - d*)²)        rmse_log = sqrt(mean (log d - log d*)²)
        a_k      = mean [max(d/d*, d*/d) < 1.25^k]
    An image without any valid pixel gives NaN for every metric.
    """
    _check_shapes(pred=pred, gt=gt, valid=valid)
    valid = valid.bool() & (gt > 0)
    weight = valid.double()
    # Invalid pixels get a harmless 1 so that no inf/NaN is ever produced where weight is 0; a
    # non-positive prediction on a valid pixel is kept (and heavily penalised), never dropped.
    d = torch.where(valid, pred.double().clamp(min=1e-12), torch.ones((), dtype=torch.float64, device=pred.device))
    g = torch.where(valid, gt.double(), torch.ones((), dtype=torch.float64, device=gt.device))
    count = weight.sum(dim=(1, 2, 3))
    safe_count = count.clamp(min=1.0)

    def mean(values: Tensor) -> Tensor:
        per_image = (values * weight).sum(dim=(1, 2, 3)) / safe_count
        return torch.where(count > 0, per_image, torch.full_like(per_image, float("nan")))

    diff = d - g
    ratio = torch.maximum(d / g, g / d)
    return {
        "abs_rel": mean(diff.abs() / g),
        "sq_rel": mean(diff**2 / g),
        "rmse": mean(diff**2).sqrt(),
        "rmse_log": mean((d.log() - g.log()) ** 2).sqrt(),
        "a1": mean((ratio < 1.25).double()),
        "a2": mean((ratio < 1.25**2).double()),
        "a3": mean((ratio < 1.25**3).double()),
    }


def garg_crop_mask(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``(H, W)`` bool, True inside the Garg crop of a ground truth of that size.

    Rows ``int(0.40810811·H) .. int(0.99189189·H)`` and columns ``int(0.03594771·W) ..
    int(0.96405229·W)`` (end exclusive), truncated as in the reference evaluation code.
    """
    top, bottom, left, right = GARG_CROP
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    return mask


def range_mask(gt: Tensor, min_depth: float = MIN_EVAL_DEPTH, max_depth: float = MAX_EVAL_DEPTH) -> Tensor:
    """Bool mask of ground-truth pixels with ``min_depth < gt < max_depth`` (0 = no value drops out)."""
    return (gt > min_depth) & (gt < max_depth)


def median_scale(pred: Tensor, gt: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each prediction by ``median(gt) / median(pred)`` over its valid pixels.

    pred, gt, valid: ``(B, 1, H, W)``. Returns the scaled prediction (same dtype as pred) and the
    per-image ratios ``(B,)`` float64 (1 for an image without valid pixels). The median is the
    mean of the two middle values for an even count (as numpy's).
    """
    _check_shapes(pred=pred, gt=gt, valid=valid)
    valid = valid.bool() & (gt > 0) & (pred > 0)
    ratios = []
    for i in range(pred.shape[0]):
        mask = valid[i]
        if not bool(mask.any()):
            ratios.append(torch.tensor(1.0, dtype=torch.float64))
            continue
        gt_median = torch.quantile(gt[i][mask].double(), 0.5)
        pred_median = torch.quantile(pred[i][mask].double(), 0.5)
        ratios.append((gt_median / pred_median).cpu())
    ratio = torch.stack(ratios).to(pred.device)
    return (pred.double() * ratio.view(-1, 1, 1, 1)).to(pred.dtype), ratio


def pixel_errors(pred: Tensor, gt: Tensor, error: SparsificationError = "abs_rel") -> Tensor:
    """Per-pixel error whose mean over a set is the metric: ``|d - d*|/d*`` or ``(d - d*)²``."""
    diff = pred.double() - gt.double()
    if error == "abs_rel":
        return diff.abs() / gt.double().clamp(min=1e-12)
    if error == "rmse":
        return diff**2
    raise ValueError(f"sparsification error must be 'abs_rel' or 'rmse', got {error!r}")


def _removal_curve(errors_in_order: Tensor, fractions: Tensor, error: SparsificationError) -> Tensor:
    """Metric of the pixels left after removing the *last* ``f·n`` of ``errors_in_order``."""
    n = errors_in_order.numel()
    kept = (n - torch.floor(fractions * n)).clamp(min=1).long()
    cumulative = torch.cumsum(errors_in_order, dim=0)
    curve = cumulative[kept - 1] / kept.double()
    return curve.sqrt() if error == "rmse" else curve


def sparsification_curves(
    pred: Tensor, gt: Tensor, valid: Tensor, confidence: Tensor, *, steps: int = 20,
    error: SparsificationError = "abs_rel",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparsification curves of each image (Ilg et al. 2018; Poggi et al. 2020).

    pred, gt, valid, confidence: ``(B, 1, H, W)``. For removed fractions ``f = 0, 1/steps, ...,
    (steps-1)/steps`` the *curve* is the error (``abs_rel`` = mean |d - d*|/d*, or ``rmse``) of the
    valid pixels left after removing the fraction ``f`` with the LOWEST confidence; the *oracle*
    removes the pixels with the largest true error instead. At least one pixel is always kept.
    Returns ``fractions (steps,)``, ``curve (B, steps)``, ``oracle (B, steps)`` and ``full (B,)``
    (the error of all valid pixels: the expected curve of a random confidence). float64; rows of
    images without a valid pixel are NaN.
    """
    _check_shapes(pred=pred, gt=gt, valid=valid, confidence=confidence)
    valid = valid.bool() & (gt > 0)
    fractions = torch.arange(steps, dtype=torch.float64) / steps
    errors = pixel_errors(pred, gt, error)
    curves, oracles, fulls = [], [], []
    for i in range(pred.shape[0]):
        mask = valid[i]
        e = errors[i][mask].cpu()
        if e.numel() == 0:
            curves.append(torch.full((steps,), float("nan"), dtype=torch.float64))
            oracles.append(torch.full((steps,), float("nan"), dtype=torch.float64))
            fulls.append(torch.tensor(float("nan"), dtype=torch.float64))
            continue
        c = confidence[i][mask].double().cpu()
        # Most confident first, so removing "the last f·n" removes the least confident pixels.
        by_confidence = e[torch.argsort(c, descending=True, stable=True)]
        by_error = torch.sort(e).values
        curves.append(_removal_curve(by_confidence, fractions, error))
        oracles.append(_removal_curve(by_error, fractions, error))
        fulls.append(_removal_curve(e, torch.zeros(1, dtype=torch.float64), error)[0])
    return fractions, torch.stack(curves), torch.stack(oracles), torch.stack(fulls)


def _area(values: Tensor, fractions: Tensor) -> Tensor:
    """Trapezoid area over removed fraction in [0, 1]; the curve is held flat after the last step."""
    x = torch.cat([fractions, torch.ones(1, dtype=fractions.dtype)])
    y = torch.cat([values, values[..., -1:]], dim=-1)
    return torch.trapezoid(y, x, dim=-1)


def ause_aurg(
    pred: Tensor, gt: Tensor, valid: Tensor, confidence: Tensor, *, steps: int = 20,
    error: SparsificationError = "abs_rel",
) -> tuple[Tensor, Tensor]:
    """Per-image AUSE and AURG ``(B,)`` of a confidence map (lower AUSE / higher AURG = better).

    AUSE = ∫ (curve - oracle) df, the area between the sparsification curve and the oracle;
    AURG = ∫ (full - curve) df, the area between a random confidence's curve (flat at the full
    error) and the sparsification curve. Both in the units of ``error`` over f ∈ [0, 1].
    A confidence ordered exactly like the negative true error gives AUSE = 0.
    """
    fractions, curve, oracle, full = sparsification_curves(
        pred, gt, valid, confidence, steps=steps, error=error
    )
    ause = _area(curve - oracle, fractions)
    aurg = _area(full.unsqueeze(-1) - curve, fractions)
    return ause.to(pred.device), aurg.to(pred.device)
