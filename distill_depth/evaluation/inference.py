"""Run trained branches on images of any size: resize in, infer, resize out, flip TTA, fusion.

Shared by ``distill-depth evaluate`` and ``distill-depth predict`` so that both see exactly the
same depth for the same image.
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from typing import Protocol as TypingProtocol

import torch
import torch.nn.functional as F
from braceexpand import braceexpand
from PIL import Image
from torch import Tensor

from distill_depth.config import Config
from distill_depth.losses.distill import aligns_u_scale, median_scale

NETWORK_MULTIPLE = 32
"""Input sides must be multiples of this (five stride-2 stages of the encoder)."""


class DepthBranch(TypingProtocol):
    """What evaluation needs of a branch (``SupervisedBranch`` / ``SelfSupervisedBranch``)."""

    def infer(self, image: Tensor) -> tuple[Tensor, Tensor]: ...


def resize_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` maps to ``size = (H', W')`` (identity when equal)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def training_size(cfg: Config) -> tuple[int, int] | None:
    """``(H, W)`` the branches were trained at, from the training shards if they are reachable.

    The manifest's ``resolution`` when it names one; for ``native`` shards the size of the first
    stored ``rgb.jpg``. None when the training shards are not on this machine.
    """
    spec = cfg.data.train_shards
    if not spec:
        return None
    folder = Path(spec)
    first_tar: Path | None = None
    if (folder / "manifest.json").is_file():
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        size = _size_from_manifest(manifest)
        if size is not None:
            return size
        shards = manifest.get("shards") or []
        if shards and isinstance(shards[0], dict) and "name" in shards[0]:
            first_tar = folder / shards[0]["name"]
    elif spec.endswith(".tar"):
        first_tar = Path(next(iter(braceexpand(spec)))) if "{" in spec else folder
    return _first_image_size(first_tar) if first_tar is not None else None


def _first_image_size(tar_path: Path) -> tuple[int, int] | None:
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".rgb.jpg"):
                    with Image.open(tar.extractfile(member)) as image:  # type: ignore[arg-type]
                        return image.height, image.width
    except (OSError, tarfile.TarError, ValueError):
        return None
    return None


def _size_from_manifest(manifest: dict) -> tuple[int, int] | None:
    for key in ("resolution", "size", "image_size"):
        value = manifest.get(key)
        if isinstance(value, dict) and "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return int(value[0]), int(value[1])  # (H, W), the order of orig_hw and of tensors
    if "height" in manifest and "width" in manifest:
        return int(manifest["height"]), int(manifest["width"])
    return None


def network_size(image_hw: tuple[int, int], requested: tuple[int, int] | None) -> tuple[int, int]:
    """The input size fed to the network: ``requested`` (the training size) or the image's own size
    rounded up to a multiple of :data:`NETWORK_MULTIPLE`."""
    if requested is not None:
        height, width = requested
    else:
        height, width = image_hw
    round_up = lambda n: max(NETWORK_MULTIPLE, int(math.ceil(n / NETWORK_MULTIPLE)) * NETWORK_MULTIPLE)  # noqa: E731
    return round_up(height), round_up(width)


@torch.no_grad()
def infer_at_size(
    branch: DepthBranch, image: Tensor, input_size: tuple[int, int], *, flip_tta: bool = False
) -> tuple[Tensor, Tensor]:
    """Depth and confidence ``(B, 1, H, W)`` at the image's own size.

    image ``(B, 3, H, W)`` in [0, 1] is resized (bilinear) to ``input_size``, inferred, and the
    maps resized back (bilinear on depth). With ``flip_tta`` the prediction of the mirrored image
    is mirrored back and combined: depth by the geometric mean (mean of log depth), confidence by
    the arithmetic mean.
    """
    height, width = image.shape[-2:]
    network_input = resize_map(image.float(), input_size)
    depth, confidence = branch.infer(network_input)
    if flip_tta:
        depth_flip, confidence_flip = branch.infer(network_input.flip(-1))
        depth = torch.exp(0.5 * (depth.float().log() + depth_flip.float().flip(-1).log()))
        confidence = 0.5 * (confidence.float() + confidence_flip.float().flip(-1))
    depth = resize_map(depth.float(), (height, width))
    confidence = resize_map(confidence.float(), (height, width)).clamp(0.0, 1.0)
    return depth, confidence


def fuse(
    depth_s: Tensor, confidence_s: Tensor, depth_u: Tensor, confidence_u: Tensor, *, align_u_scale: bool
) -> tuple[Tensor, Tensor]:
    """Confidence-weighted fusion of both branches, ``(B, 1, H, W)`` each.

        log D_f = (C_s · log D_s + C_u · log(k · D_u)) / (C_s + C_u)
        C_f     = (C_s² + C_u²) / (C_s + C_u)      (the confidence-weighted mean confidence)

    k = median(D_s) / median(D_u) per image when ``align_u_scale`` (U trained monocular-only has
    no metric scale of its own, the same alignment as L_s<-u), else 1.
    """
    if align_u_scale:
        depth_u = depth_u * median_scale(depth_s, depth_u, torch.ones_like(depth_s, dtype=torch.bool))
    weight_sum = (confidence_s + confidence_u).clamp(min=1e-6)
    log_depth = (confidence_s * depth_s.clamp(min=1e-6).log() + confidence_u * depth_u.clamp(min=1e-6).log()) / weight_sum
    confidence = (confidence_s**2 + confidence_u**2) / weight_sum
    return log_depth.exp(), confidence


def fusion_aligns_u(cfg: Config) -> bool:
    """Whether :func:`fuse` rescales U to S's median: the training rule of ``loss.scale_align``."""
    return aligns_u_scale(cfg.loss.scale_align, cfg.data.uses_stereo)


def needs_median_scaling(cfg: Config, mode: str, output: str) -> bool:
    """Median scaling of one output (``S``, ``U`` or ``fused``): ``on``/``off`` as asked; ``auto`` =
    on only for a network without any metric signal: U trained without stereo and without S's
    depth distilled into it (U alone, or ``loss.distill_direction`` none / s_from_u). S learns
    metres from LiDAR; the fusion takes S's scale."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise ValueError(f"median scaling must be auto, on or off, got {mode!r}")
    if output != "U" or cfg.data.uses_stereo:
        return False
    taught_by_s = "S" in cfg.branches and cfg.loss.distill_direction in ("both", "u_from_s")
    return not taught_by_s
