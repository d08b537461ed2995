"""Mutual distillation: L_s<-u and L_u<-s, scale alignment and the warm-up ramp (METHOD.md, "Mutual distillation")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from distill_depth.geometry import warp_to_target
from distill_depth.losses.common import finite, fp32, masked_mean, sanitize
from distill_depth.losses.photometric import photometric


def distill_ramp(step: int, max_steps: int, lambda_d: float, warmup: float, start: float = 0.0) -> float:
    """Weight of a distillation term at ``step``: λ_d · clamp((step − S) / W, 0, 1).

    S = ``start`` and W = ``warmup`` are each a fraction of ``max_steps`` when < 1, else a number of
    steps: 0 until step S, then linear up to λ_d at step S + W; W = 0 gives λ_d from step S on.
    """
    start_step = start * max_steps if start < 1 else start
    warmup_steps = warmup * max_steps if warmup < 1 else warmup
    if step < start_step:
        return 0.0
    if warmup_steps <= 0:
        return float(lambda_d)
    return float(lambda_d) * min(1.0, (step - start_step) / warmup_steps)


def aligns_u_scale(scale_align: str, use_stereo: bool) -> bool:
    """Whether L_s<-u rescales U's depth by k (``loss.scale_align``): ``on``/``off`` as set;
    ``auto`` = on when U trains without the stereo partner (monocular: no metric scale of its own)."""
    return {"on": True, "off": False}.get(scale_align, not use_stereo)


def _valid_depth(depth: Tensor) -> Tensor:
    return finite(depth) & (depth > 0)


@fp32
def median_scale(student_depth: Tensor, teacher_depth: Tensor, mask: Tensor) -> Tensor:
    """k = median(D_student) / median(D_teacher) per image over ``mask``, detached; (B, 1, 1, 1).

    Images without a valid pixel get k = 1. Inputs (B, 1, H, W).
    """
    mask = mask & _valid_depth(student_depth) & _valid_depth(teacher_depth)
    scales = []
    for s, t, m in zip(student_depth.detach(), teacher_depth.detach(), mask):
        if m.any():
            scales.append(s[m].median() / t[m].median())
        else:
            scales.append(torch.ones((), device=s.device))
    return torch.stack(scales).view(-1, 1, 1, 1)


def lidar_coverage(sparse_depth: Tensor) -> tuple[Tensor, Tensor]:
    """Where an image's LiDAR reaches: per column, the rows from its highest to its lowest return.

    sparse_depth (B, 1, H, W), 0 = no return. Returns (covered (B, 1, H, W) bool, has_lidar (B,)
    bool). Above the top beam, and in columns without any return, nothing is covered.
    """
    hit = torch.isfinite(sparse_depth) & (sparse_depth > 0)
    rows = torch.arange(hit.shape[-2], device=hit.device).view(1, 1, -1, 1)
    big = hit.shape[-2]
    top = torch.where(hit, rows, big).amin(dim=-2, keepdim=True)
    bottom = torch.where(hit, rows, -1).amax(dim=-2, keepdim=True)
    covered = (rows >= top) & (rows <= bottom)
    return covered, hit.flatten(1).any(dim=1)


@fp32
def lidar_trust(student_depth: Tensor, teacher_depth: Tensor, sparse_depth: Tensor, mask: Tensor,
                scale_align: bool = False) -> tuple[Tensor, Tensor]:
    """How far S may trust U, measured where the truth is known: per image

        t = min(1, median_{p in Ω} |log D_s − log D*| / median_{p in Ω} |log(D_u·k) − log D*|)

    over the LiDAR pixels Ω of ``sparse_depth`` inside ``mask`` (k as in :func:`distill`). A teacher
    as accurate as the student at the LiDAR points gets t = 1, one three times worse t = 1/3:
    the two confidences are trained on different errors (LiDAR vs photometric), this ratio puts
    them on S's scale. Inputs (B, 1, H, W), all detached; returns (t (B,), has_lidar (B,) bool),
    t = 1 where an image has no LiDAR pixel (the caller decides what those get).
    """
    student_depth, teacher_depth = student_depth.detach(), teacher_depth.detach()
    mask = mask & _valid_depth(student_depth) & _valid_depth(teacher_depth) & _valid_depth(sparse_depth)
    if scale_align:
        teacher_depth = teacher_depth * median_scale(student_depth, teacher_depth, mask)
    target = torch.log(sanitize(sparse_depth, mask, 1.0))
    student_error = (torch.log(sanitize(student_depth, mask, 1.0)) - target).abs()
    teacher_error = (torch.log(sanitize(teacher_depth, mask, 1.0)) - target).abs()
    trust, has_lidar = [], []
    for e_s, e_t, m in zip(student_error, teacher_error, mask):
        if m.any():
            trust.append((e_s[m].median() / e_t[m].median().clamp(min=1e-6)).clamp(max=1.0))
        else:
            trust.append(torch.ones((), device=m.device))
        has_lidar.append(m.any())
    return torch.stack(trust), torch.stack(has_lidar)


@fp32
def distill(
    student_depth: Tensor,
    teacher_depth: Tensor,
    teacher_confidence: Tensor,
    mask: Tensor,
    scale_align: bool = False,
    student_confidence: Tensor | None = None,
    image_weight: Tensor | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """Confidence-weighted log-depth L1 from a detached teacher, either direction:

        L_s<-u = mean_p [ sg(C_u(p)) · |log D_s(p) − log(sg(D_u(p)) · k)| ]   (scale_align=True)
        L_u<-s = mean_p [ sg(C_s(p)) · |log D_u(p) − log sg(D_s(p))| ]        (scale_align=False)

    With ``student_confidence`` (``loss.distill_gate: relative``) the weight is
    sg(C_teacher) · [C_teacher > sg(C_student)]: the student learns only where the teacher is
    surer than itself. ``image_weight`` (B,) multiplies every pixel of an image (``loss.partner_trust``).
    ``keep`` (B, 1, H, W) bool zeroes the weight outside it (``loss.u_distill_pixels``); unlike
    ``mask`` it does not change the mean's denominator, so a gate that keeps few pixels does not
    scale up their gradient.
    k = median(D_s) / median(D_u) per image (detached) over the compared pixels. p ranges over
    ``mask`` (B, 1, H, W) bool — both branches' canonical valid masks — and the pixels where both
    depths are finite and positive. All maps are full-resolution canonical-frame (B, 1, H, W).
    Only the student receives gradients. Empty mask → 0.
    """
    teacher_depth = teacher_depth.detach()
    teacher_confidence = teacher_confidence.detach()
    mask = mask & _valid_depth(student_depth) & _valid_depth(teacher_depth) & finite(teacher_confidence)
    if scale_align:
        teacher_depth = teacher_depth * median_scale(student_depth, teacher_depth, mask)
    student = sanitize(student_depth, mask, 1.0)
    teacher = sanitize(teacher_depth, mask, 1.0)
    weight = sanitize(teacher_confidence, mask, 0.0).clamp(0.0, 1.0)
    if student_confidence is not None:
        student_confidence = sanitize(student_confidence.detach(), mask, 1.0)
        weight = torch.where(weight > student_confidence, weight, torch.zeros_like(weight))
    if image_weight is not None:
        weight = weight * image_weight.detach().view(-1, 1, 1, 1)
    if keep is not None:
        weight = torch.where(keep.to(weight.device), weight, torch.zeros_like(weight))
    return masked_mean(weight * (torch.log(student) - torch.log(teacher)).abs(), mask)


@torch.no_grad()
def most_confident(confidence: Tensor, mask: Tensor, share: float) -> Tensor:
    """Per image, the pixels of ``mask`` whose confidence is among the top ``share`` of that image's
    ``mask`` pixels (ties at the threshold kept):

        keep(p) = mask(p) ∧ C(p) ≥ the ⌈share · |mask|⌉-th largest C over the image's mask

    confidence (B, 1, H, W), mask (B, 1, H, W) bool, share in (0, 1]. Returns (B, 1, H, W) bool;
    an image with an empty mask keeps nothing. Sorting, not boolean indexing: no device sync.
    """
    B, confidence = confidence.shape[0], confidence.float()
    flat = torch.where(mask, confidence, -math.inf).flatten(1)  # (B, N)
    ordered = flat.sort(dim=1, descending=True).values
    k = (mask.flatten(1).sum(dim=1) * share).ceil().long().clamp(min=1)
    threshold = ordered.gather(1, (k - 1)[:, None]).view(B, 1, 1, 1)
    return mask & (confidence >= threshold)


@torch.no_grad()
def reprojects_better(
    teacher_depth: Tensor,
    student_error: Tensor,
    student_kept: Tensor,
    target: Tensor,
    sources: Sequence[Tensor],
    poses: Sequence[Tensor],
    K: Tensor,
    alpha: float = 0.85,
) -> Tensor:
    """Where a depth hint beats the student's own depth on the student's own frames (Depth Hints,
    Watson et al., ICCV 2019):

        R = { p : pe_min(D_teacher)(p) < pe_min(D_student)(p) }  ∪  { p : auto-masking dropped p }

    pe_min(D) is the minimum photometric error over ``sources`` warped into ``target`` with depth D
    and the student's ``poses`` (T_target_to_source, detached). ``student_error`` is the student's
    pe_min before auto-masking (:func:`photometric` with ``return_unmasked``) and ``student_kept``
    its auto-mask: where auto-masking dropped a pixel the frames hold no evidence about depth
    (objects moving with the camera), so the teacher is not vetoed there. A teacher pixel that is
    not a finite positive depth is never in R.

    teacher_depth, student_error: (B, 1, H, W) in the student's view; student_kept (B, 1, H, W)
    bool; target, sources[k]: (B, 3, H, W) un-jittered; poses[k]: (B, 4, 4); K: (B, 3, 3).
    Returns R (B, 1, H, W) bool.
    """
    usable = _valid_depth(teacher_depth)
    depth = torch.where(usable, teacher_depth.float(), torch.ones_like(teacher_depth, dtype=torch.float32))
    warped, valid = zip(*(warp_to_target(src.float(), depth, T.detach().float(), K.float())
                          for src, T in zip(sources, poses)))
    _, _, teacher_error = photometric(target.float(), list(warped), list(valid), alpha=alpha, return_unmasked=True)
    return usable & ((teacher_error < student_error.detach()) | ~student_kept)
