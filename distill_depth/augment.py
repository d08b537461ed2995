"""Per-branch data augmentation on the device, and the way back to the canonical frame.

- weak (branch U): horizontal flip + mild colour jitter (brightness/contrast/saturation ±jitter,
  hue ±jitter/2), the same parameters for the target and its sources. ``clean_*`` images carry the
  flip only (the photometric loss compares un-jittered pixels, Monodepth2 practice).
- strong (branch S): everything of weak, plus random grayscale, blur, noise, channel shuffle and
  RandAugment-style colour ops (sharpness, posterize, solarize, equalize, autocontrast), a random
  resized crop (area fraction in ``crop_scale``, the image's aspect ratio, output H×W) and a small
  rotation about the image centre. Geometry is applied identically to the image, its sources and
  the sparse depth; sparse depth is never interpolated (each LiDAR pixel moves to its rounded new
  location, the nearest point wins a collision). A zoom by m divides the LiDAR values by m
  (``zoom_depth: scale``, Eigen et al.'s scale augmentation), and the view remembers m so that
  the prediction is multiplied back on its way to the canonical frame.

Geometry is one 3×3 matrix per sample, ``canonical_to_aug``, acting on 0-based pixel-centre
coordinates (see ``distill_depth.geometry``): ``q = R_c · F · C · p`` (crop/scale C, flip F,
rotation about the centre R_c). Images are resampled with it (kornia ``remap``), ``K`` is updated
by ``geometry``'s intrinsics functions (``None`` once a rotation is present: a rotation about the
image centre is no pinhole camera with the same K), and ``to_canonical`` resamples a prediction
back. Randomness comes from torch's global CPU RNG (drawn in a fixed order, per sample), so the
trainer's RNG save/restore makes a resumed run repeat the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import kornia.augmentation as KA
import torch
from kornia.geometry.grid import create_meshgrid
from kornia.geometry.linalg import transform_points
from kornia.geometry.transform import remap
from torch import Tensor, nn

from distill_depth.config import AugmentConfig
from distill_depth.geometry import crop_intrinsics, flip_intrinsics, flip_transform, scale_intrinsics
from distill_depth.types import Batch

__all__ = ["AugmentedView", "Augmenter", "AugmentError", "build_augmenter", "move_sparse_depth"]


class AugmentError(ValueError):
    """Bad augmentation settings or input; the message names the key and value."""


def _flip_where(x: Tensor, flipped: Tensor) -> Tensor:
    """Mirror the samples of ``x`` (B, C, H, W) whose ``flipped`` (B,) is true, exactly."""
    return torch.where(flipped.view(-1, 1, 1, 1), torch.flip(x, dims=[-1]), x)


def _pixel_rescale(size_from: tuple[int, int], size_to: tuple[int, int], like: Tensor) -> Tensor:
    """3×3 map of pixel-centre coordinates between resolutions: ``c → (c + 0.5)·s − 0.5``."""
    (h0, w0), (h1, w1) = size_from, size_to
    sx, sy = w1 / w0, h1 / h0
    return torch.tensor(
        [[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]],
        dtype=like.dtype,
        device=like.device,
    )


def _sample_at(maps: Tensor, matrix: Tensor, mode: str = "bilinear") -> tuple[Tensor, Tensor]:
    """``out(p) = maps(matrix · p)`` for every pixel p of a grid the size of ``maps``.

    maps: (B, C, h, w); matrix: (B, 3, 3) on pixel-centre coordinates. Zero padding; ``valid`` is
    (B, 1, h, w) bool, true where ``matrix · p`` falls inside ``[0, w-1] × [0, h-1]``.
    """
    B, _, h, w = maps.shape
    grid = create_meshgrid(h, w, normalized_coordinates=False, device=maps.device, dtype=torch.float32)
    points = transform_points(matrix.float(), grid.reshape(1, -1, 2).expand(B, -1, -1)).reshape(B, h, w, 2)
    x, y = points[..., 0], points[..., 1]
    out = remap(maps.float(), x, y, mode=mode, padding_mode="zeros", align_corners=True)
    tol = 1e-4  # a coordinate a hair outside the border by float error is still the border pixel
    valid = (x >= -tol) & (x <= w - 1 + tol) & (y >= -tol) & (y <= h - 1 + tol)
    return out, valid[:, None]


def move_sparse_depth(sparse_depth: Tensor, canonical_to_aug: Tensor) -> Tensor:
    """Move every valid LiDAR pixel to ``round(canonical_to_aug · p)``; no interpolation.

    sparse_depth: (B, 1, H, W) metres, 0 = none; canonical_to_aug: (B, 3, 3). Points landing
    outside the image are dropped; when several land on one pixel the nearest (smallest depth)
    wins. Returns (B, 1, H, W) whose non-zero values are a subset of the input's.
    """
    B, _, H, W = sparse_depth.shape
    flat = sparse_depth.reshape(B, H * W)
    b_idx, n_idx = torch.nonzero(torch.isfinite(flat) & (flat > 0), as_tuple=True)
    values = flat[b_idx, n_idx]
    pixels = torch.stack([(n_idx % W).float(), (n_idx // W).float(), torch.ones_like(values)], dim=-1)
    moved = torch.einsum("nij,nj->ni", canonical_to_aug[b_idx].float(), pixels)
    u, v = torch.round(moved[:, 0]).long(), torch.round(moved[:, 1]).long()
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    index = (b_idx * H * W + v * W + u)[inside]
    out = torch.full((B * H * W,), math.inf, dtype=sparse_depth.dtype, device=sparse_depth.device)
    out.scatter_reduce_(0, index, values[inside], reduce="amin")
    return torch.where(torch.isinf(out), torch.zeros_like(out), out).reshape(B, 1, H, W)


@dataclass
class AugmentedView:
    """What a branch sees after augmentation, and how to map its output back.

    image: (B, 3, H, W) colour + geometric augmentation (network input).
    sources: same parameters as ``image`` (pose-net input).
    clean_image / clean_sources: geometric augmentation only (photometric loss).
    sparse_depth: (B, 1, H, W) geometric augmentation applied, values never interpolated.
    K: (B, 3, 3) intrinsics of the augmented view, ``None`` when a rotation makes K invalid.
    stereo_T: (B, 4, 4) ``X_stereo = stereo_T · X_target`` in the augmented (flipped) world.
    flipped: (B,) bool, samples that were mirrored.
    canonical_to_aug: (B, 3, 3) pixel-centre map canonical → augmented at (H, W); ``None`` when
        the geometry is flip-only (then ``flipped`` says everything, and inversion is exact).
    depth_to_canonical: (B,) factor from a depth in the augmented view to the canonical one: the
        zoom's magnification m under ``augment.zoom_depth: scale`` (``sparse_depth`` holds D*/m),
        ``None`` when depth values are unchanged.
    """

    image: Tensor
    sources: dict[str, Tensor]
    clean_image: Tensor
    clean_sources: dict[str, Tensor]
    sparse_depth: Tensor
    K: Tensor | None
    stereo_T: Tensor | None
    flipped: Tensor | None = None
    canonical_to_aug: Tensor | None = None
    depth_to_canonical: Tensor | None = None
    params: dict[str, Tensor] = field(default_factory=dict)
    """Sampled per-sample parameters (for logging and tests): ``flip``, ``crop_scale``, ``angle_deg``..."""

    def to_canonical(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """Map (B, C, h, w) maps from the augmented frame back to the canonical frame.

        ``out(p) = maps(canonical_to_aug · p)`` (bilinear, differentiable w.r.t. ``maps``), with the
        matrix rescaled when (h, w) is not the augmented resolution. Flip-only views invert
        exactly (a mirror). Returns ``(maps_canonical (B, C, h, w), valid (B, 1, h, w) bool)``;
        pixels the augmented view did not see (outside the crop, rotated corners) are invalid.
        """
        B, _, h, w = maps.shape
        if self.canonical_to_aug is None:
            out = maps if self.flipped is None else _flip_where(maps, self.flipped.to(maps.device))
            return out, torch.ones(B, 1, h, w, dtype=torch.bool, device=maps.device)
        H, W = self.image.shape[-2:]
        to_full = _pixel_rescale((h, w), (H, W), self.canonical_to_aug)
        to_low = _pixel_rescale((H, W), (h, w), self.canonical_to_aug)
        matrix = to_low @ self.canonical_to_aug @ to_full
        with torch.autocast(device_type=maps.device.type, enabled=False):
            return _sample_at(maps, matrix.to(maps.device))


class Augmenter(nn.Module):
    """``forward(batch) -> AugmentedView``; the identity view in eval mode.

    Has no parameters or buffers (nothing enters a checkpoint).
    """

    def __init__(self, strength: Literal["weak", "strong"], cfg: AugmentConfig) -> None:
        super().__init__()
        if strength not in ("weak", "strong"):
            raise AugmentError(f"augmentation strength must be 'weak' or 'strong', got {strength!r}")
        if not 0.0 <= cfg.flip_p <= 1.0:
            raise AugmentError(f"augment.flip_p must be in [0, 1], got {cfg.flip_p}")
        if not 0.0 <= cfg.jitter < 1.0:
            raise AugmentError(f"augment.jitter must be in [0, 1), got {cfg.jitter}")
        lo, hi = cfg.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise AugmentError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}")
        if not 0.0 <= cfg.rotation_deg < 90.0:
            raise AugmentError(f"augment.rotation_deg must be in [0, 90), got {cfg.rotation_deg}")
        if cfg.zoom_depth not in ("scale", "keep"):
            raise AugmentError(f"augment.zoom_depth must be 'scale' or 'keep', got {cfg.zoom_depth!r}")
        self.strength = strength
        self.cfg = cfg
        j = cfg.jitter
        colour: list[nn.Module] = [KA.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 2, p=1.0)]
        if strength == "strong":
            colour += [
                KA.RandomGrayscale(p=0.2),
                KA.RandomGaussianBlur(kernel_size=5, sigma=(0.1, 1.5), p=0.2),
                KA.RandomGaussianNoise(mean=0.0, std=0.02, p=0.2),
                KA.RandomChannelShuffle(p=0.1),
                # RandAugment-style colour ops (only photometric ones: geometry is ours)
                KA.RandomSharpness(sharpness=0.5, p=0.2),
                KA.RandomPosterize(bits=5, p=0.1),
                KA.RandomSolarize(thresholds=0.1, additions=0.1, p=0.1),
                KA.RandomEqualize(p=0.1),
                KA.RandomAutoContrast(p=0.1),
            ]
        # a plain list, not a ModuleList: kornia's samplers keep their ranges in buffers, and an
        # augmenter must add nothing to a branch's state_dict (checkpoints, DDP broadcasts)
        self._colour_ops: list[nn.Module] = colour
        self.geometric = strength == "strong" and (lo < 1.0 or cfg.rotation_deg > 0)

    def extra_repr(self) -> str:
        return f"strength={self.strength}, cfg={self.cfg}"

    # -- sampling (global CPU RNG, fixed order) ---------------------------------------------

    def _sample_geometry(self, batch_size: int, height: int, width: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample canonical→aug matrices (B, 3, 3) and their parameters, on the CPU."""
        lo, hi = self.cfg.crop_scale
        area = lo + (hi - lo) * torch.rand(batch_size)
        side = area.sqrt()
        # crop box edges in edge coordinates (the image spans [0, W] × [0, H])
        left = (1.0 - side) * width * torch.rand(batch_size)
        top = (1.0 - side) * height * torch.rand(batch_size)
        angle = (2 * torch.rand(batch_size) - 1) * self.cfg.rotation_deg
        flipped = torch.rand(batch_size) < self.cfg.flip_p

        eye = torch.eye(3).repeat(batch_size, 1, 1)
        crop = eye.clone()  # u' = (u + 0.5 - left) / side - 0.5
        crop[:, 0, 0] = crop[:, 1, 1] = 1.0 / side
        crop[:, 0, 2] = (0.5 - left) / side - 0.5
        crop[:, 1, 2] = (0.5 - top) / side - 0.5
        flip = eye.clone()
        flip[flipped, 0, 0] = -1.0
        flip[flipped, 0, 2] = width - 1.0
        cx, cy = (width - 1) / 2, (height - 1) / 2
        theta = torch.deg2rad(angle)
        cos, sin = theta.cos(), theta.sin()
        rotate = eye.clone()  # rotation about the image centre
        rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, -sin, sin, cos
        rotate[:, 0, 2] = cx - cos * cx + sin * cy
        rotate[:, 1, 2] = cy - sin * cx - cos * cy
        matrix = rotate @ flip @ crop
        params = {"flip": flipped, "crop_scale": area, "crop_left": left, "crop_top": top, "angle_deg": angle}
        return matrix, params

    def _sample_colour(self, shape: torch.Size) -> list[dict[str, Tensor]]:
        """One parameter set per colour op, replayed on the target and every source.

        Sampled on the CPU like kornia's own forward does (its ops move them to the input's device).
        """
        return [op.forward_parameters(shape) for op in self._colour_ops]

    def _colour(self, image: Tensor, params: list[dict[str, Tensor]]) -> Tensor:
        for op, op_params in zip(self._colour_ops, params):
            image = op(image, params=op_params)
        return image.clamp(0.0, 1.0)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> AugmentedView:
        if not self.training:
            return identity_view(batch)
        image = batch.image
        if image.ndim != 4 or image.shape[1] != 3:
            raise AugmentError(f"batch.image: expected (B, 3, H, W), got {tuple(image.shape)}")
        B, _, H, W = image.shape
        device = image.device
        with torch.autocast(device_type=device.type, enabled=False):
            if self.strength == "strong":
                matrix, params = self._sample_geometry(B, H, W)
                flipped = params["flip"].to(device)
            else:
                flipped_cpu = torch.rand(B) < self.cfg.flip_p
                matrix, params = None, {"flip": flipped_cpu}
                flipped = flipped_cpu.to(device)
            colour_params = self._sample_colour(image.shape)

            if self.geometric:
                aug_to_canonical = torch.linalg.inv(matrix.double()).float().to(device)
                matrix = matrix.to(device)
                geometric = lambda x: _sample_at(x.float(), aug_to_canonical)[0]  # noqa: E731
                sparse = move_sparse_depth(batch.sparse_depth.float(), matrix)
                depth_to_canonical = None
                if self.cfg.zoom_depth == "scale" and self.cfg.crop_scale[0] < 1.0:
                    # magnification m = 1/side: the zoomed view shows the scene as if m times closer
                    depth_to_canonical = params["crop_scale"].rsqrt().to(device)
                    sparse = sparse / depth_to_canonical.view(-1, 1, 1, 1)
                K = self._augment_intrinsics(batch.K, params, W) if self.cfg.rotation_deg == 0 else None
            else:
                matrix, depth_to_canonical = None, None  # flip only: exact mirror, no resampling
                geometric = lambda x: _flip_where(x.float(), flipped)  # noqa: E731
                sparse = _flip_where(batch.sparse_depth.float(), flipped)
                K = flip_intrinsics(batch.K.float(), W, flipped)

            clean_image = geometric(image)
            clean_sources = {name: geometric(src) for name, src in batch.sources.items()}
            view_image = self._colour(clean_image, colour_params)
            view_sources = {name: self._colour(src, colour_params) for name, src in clean_sources.items()}
            stereo_T = None if batch.stereo_T is None else flip_transform(batch.stereo_T.float(), flipped)
        return AugmentedView(
            image=view_image,
            sources=view_sources,
            clean_image=clean_image,
            clean_sources=clean_sources,
            sparse_depth=sparse,
            K=K,
            stereo_T=stereo_T,
            flipped=flipped,
            canonical_to_aug=matrix,
            depth_to_canonical=depth_to_canonical,
            params=params,
        )

    @staticmethod
    def _augment_intrinsics(K: Tensor, params: dict[str, Tensor], width: int) -> Tensor:
        """K after crop (box edge at left/top) → resize by 1/side → flip; rotation-free only."""
        K = K.float()
        side = params["crop_scale"].sqrt().to(K.device)
        # left/top are edge coordinates (the image spans [0, W]), so the crop's first pixel centre
        # sits at left - 0.5 + 0.5 = left in pixel-centre coordinates
        K = crop_intrinsics(K, params["crop_left"].to(K.device), params["crop_top"].to(K.device))
        K = scale_intrinsics(K, 1.0 / side, 1.0 / side)
        return flip_intrinsics(K, width, params["flip"].to(K.device))


def identity_view(batch: Batch) -> AugmentedView:
    """The un-augmented view (eval mode): images are the batch's own tensors."""
    return AugmentedView(
        image=batch.image,
        sources=dict(batch.sources),
        clean_image=batch.image,
        clean_sources=dict(batch.sources),
        sparse_depth=batch.sparse_depth,
        K=batch.K,
        stereo_T=batch.stereo_T,
    )


def build_augmenter(strength: Literal["weak", "strong"], cfg: AugmentConfig) -> Augmenter:
    """The augmenter of a branch: ``strength`` is ``cfg.u_strength`` for U, ``cfg.s_strength`` for S."""
    return Augmenter(strength, cfg)
