"""Pinhole geometry: back-projection, rigid transforms, projection, view warping, intrinsics.

Conventions (the whole project follows them; see docs/geometry.md):

- ``K`` is ``(B, 3, 3)`` in **0-based pixel-centre** coordinates at the tensor's resolution: the
  centre of pixel column ``u`` is ``x = u`` (not ``u + 0.5``). Pixel edges lie at ``-0.5`` and
  ``W - 0.5``.
- Depth is the camera-frame ``z`` in metres; 0 means "no value".
- ``T_target_to_source`` maps target-camera points into the source camera: ``X_s = T · X_t``.
- A horizontal flip mirrors the world: ``cx' = W - 1 - cx`` (``fx`` stays positive) and every
  rigid transform becomes ``F · T · F`` with ``F = diag(-1, 1, 1, 1)``.

kornia does the per-pixel work (back-projection, projection, axis-angle → rotation, sampling);
this module composes it and keeps every intrinsics change in one place. Everything runs in fp32
with autocast disabled, whatever the caller's autocast state.
"""

from __future__ import annotations

import torch
from kornia.geometry.camera.perspective import project_points
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from kornia.geometry.depth import depth_to_3d_v2
from kornia.geometry.linalg import transform_points as _kornia_transform_points
from kornia.geometry.transform import remap
from torch import Tensor

__all__ = [
    "GeometryError",
    "backproject",
    "transform_points",
    "project",
    "pose_from_axis_angle",
    "warp_to_target",
    "scale_intrinsics",
    "crop_intrinsics",
    "flip_intrinsics",
    "flip_transform",
    "FLIP",
]

MIN_DEPTH = 1e-3
"""Points closer than this (metres, camera z) count as behind the camera: invalid."""

FLIP = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
"""F = diag(-1, 1, 1, 1): the world mirror x → -x that a horizontal image flip corresponds to."""


class GeometryError(ValueError):
    """A geometry input has the wrong shape; the message names the argument and its shape."""


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _check(name: str, tensor: Tensor, shape: tuple[int | None, ...]) -> None:
    if not isinstance(tensor, Tensor):
        raise GeometryError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    ok = tensor.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, tensor.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise GeometryError(f"{name}: expected shape {want}, got {tuple(tensor.shape)}")


def backproject(depth: Tensor, K: Tensor) -> Tensor:
    """Camera-frame 3-D point of every pixel: ``X = depth · K⁻¹ (u, v, 1)ᵀ``.

    depth: ``(B, 1, H, W)`` metres. K: ``(B, 3, 3)``. Returns ``(B, 3, H, W)`` points (x, y, z).
    """
    _check("depth", depth, (None, 1, None, None))
    _check("K", K, (depth.shape[0], 3, 3))
    with _no_autocast(depth.device):
        points = depth_to_3d_v2(depth[:, 0].float(), K.float())  # (B, H, W, 3)
    return points.permute(0, 3, 1, 2)


def transform_points(points: Tensor, T: Tensor) -> Tensor:
    """Apply a rigid 4×4 transform to a point map: ``X' = R X + t``.

    points: ``(B, 3, H, W)``. T: ``(B, 4, 4)``. Returns ``(B, 3, H, W)``.
    """
    _check("points", points, (None, 3, None, None))
    _check("T", T, (points.shape[0], 4, 4))
    B, _, H, W = points.shape
    with _no_autocast(points.device):
        flat = points.float().flatten(2).transpose(1, 2)  # (B, N, 3)
        moved = _kornia_transform_points(T.float(), flat)
    return moved.transpose(1, 2).reshape(B, 3, H, W)


def project(points: Tensor, K: Tensor) -> Tensor:
    """Pixel coordinates of camera-frame points: ``(fx x/z + cx, fy y/z + cy)``.

    points: ``(B, 3, H, W)``. K: ``(B, 3, 3)``. Returns ``(B, 2, H, W)`` with channels (x, y).
    Points at or behind the camera give finite but meaningless pixels; ``warp_to_target`` masks them.
    """
    _check("points", points, (None, 3, None, None))
    _check("K", K, (points.shape[0], 3, 3))
    B, _, H, W = points.shape
    with _no_autocast(points.device):
        flat = points.float().flatten(2).transpose(1, 2)  # (B, N, 3)
        pixels = project_points(flat, K.float()[:, None])  # (B, N, 2)
    return pixels.transpose(1, 2).reshape(B, 2, H, W)


def pose_from_axis_angle(axis_angle: Tensor, translation: Tensor) -> Tensor:
    """4×4 rigid transform ``[[R(axis_angle), t], [0, 1]]`` (Rodrigues via kornia).

    axis_angle: ``(B, 3)`` rotation vector (radians). translation: ``(B, 3)`` metres. Returns ``(B, 4, 4)``.
    """
    _check("axis_angle", axis_angle, (None, 3))
    _check("translation", translation, (axis_angle.shape[0], 3))
    with _no_autocast(axis_angle.device):
        rotation = axis_angle_to_rotation_matrix(axis_angle.float())  # (B, 3, 3)
        top = torch.cat([rotation, translation.float()[:, :, None]], dim=2)  # (B, 3, 4)
        bottom = torch.zeros_like(top[:, :1])
        bottom[..., 3] = 1.0
        return torch.cat([top, bottom], dim=1)


def warp_to_target(
    source: Tensor, target_depth: Tensor, T_target_to_source: Tensor, K: Tensor
) -> tuple[Tensor, Tensor]:
    """Resample a source frame into the target view (inverse warping).

    For every target pixel p with depth D(p): ``p_s = π(K · T · D(p) K⁻¹ p̃)`` and
    ``warped(p) = source(p_s)`` (bilinear, border padding, 0-based pixel centres).

    source: ``(B, C, H, W)``. target_depth: ``(B, 1, H, W)`` metres. T_target_to_source: ``(B, 4, 4)``.
    K: ``(B, 3, 3)`` shared by both views.
    Returns ``warped (B, C, H, W)`` fp32 and ``valid (B, 1, H, W)`` bool: the projected point lies
    in front of the source camera (z > 1 mm) and inside ``[0, W-1] × [0, H-1]``.
    Differentiable w.r.t. source, depth, pose and K.
    """
    _check("source", source, (None, None, None, None))
    _check("target_depth", target_depth, (source.shape[0], 1, source.shape[2], source.shape[3]))
    B, _, H, W = source.shape
    with _no_autocast(source.device):
        points_t = backproject(target_depth.float(), K)
        points_s = transform_points(points_t, T_target_to_source)
        pixels = project(points_s, K)  # (B, 2, H, W)
        x, y = pixels[:, 0], pixels[:, 1]
        warped = remap(
            source.float(), x, y, mode="bilinear", padding_mode="border", align_corners=True
        )
        in_front = points_s[:, 2] > MIN_DEPTH
        inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
        valid = (in_front & inside)[:, None]
    return warped, valid


# --- intrinsics: every change of K lives here ------------------------------------------------


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or ``(B,)`` value as a ``(B,)`` tensor on K's device and dtype."""
    out = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return out.expand(like.shape[0]) if out.ndim == 0 else out


def scale_intrinsics(K: Tensor, sx: float | Tensor, sy: float | Tensor) -> Tensor:
    """K after resizing the image by (sx, sy) (new size = old size × s).

    Pixel centres move as ``c → (c + 0.5)·s − 0.5``; focal lengths scale by s.
    K: ``(B, 3, 3)``; sx, sy: scalars or ``(B,)``. Returns a new ``(B, 3, 3)``.
    """
    _check("K", K, (None, 3, 3))
    sx, sy = _per_sample(sx, K), _per_sample(sy, K)
    out = K.clone()
    out[:, 0, 0] = K[:, 0, 0] * sx
    out[:, 0, 1] = K[:, 0, 1] * sx
    out[:, 1, 1] = K[:, 1, 1] * sy
    out[:, 0, 2] = (K[:, 0, 2] + 0.5) * sx - 0.5
    out[:, 1, 2] = (K[:, 1, 2] + 0.5) * sy - 0.5
    return out


def crop_intrinsics(K: Tensor, x0: float | Tensor, y0: float | Tensor) -> Tensor:
    """K after cropping with the crop's top-left pixel centre at (x0, y0) of the old image.

    ``cx' = cx − x0``, ``cy' = cy − y0`` (x0, y0 may be fractional: a crop box edge at e gives
    x0 = e + 0.5). K: ``(B, 3, 3)``; x0, y0: scalars or ``(B,)``.
    """
    _check("K", K, (None, 3, 3))
    out = K.clone()
    out[:, 0, 2] = K[:, 0, 2] - _per_sample(x0, K)
    out[:, 1, 2] = K[:, 1, 2] - _per_sample(y0, K)
    return out


def flip_intrinsics(K: Tensor, width: int, flipped: Tensor | None = None) -> Tensor:
    """K after a horizontal flip of an image ``width`` pixels wide: ``cx' = W − 1 − cx``.

    The flip is read as mirroring the world (x → −x), so fx stays positive. ``flipped`` (``(B,)``
    bool, optional) flips only those samples. K: ``(B, 3, 3)``.
    """
    _check("K", K, (None, 3, 3))
    out = K.clone()
    new_cx = (width - 1) - K[:, 0, 2]
    out[:, 0, 2] = new_cx if flipped is None else torch.where(flipped.to(K.device), new_cx, K[:, 0, 2])
    out[:, 0, 1] = -K[:, 0, 1] if flipped is None else torch.where(flipped.to(K.device), -K[:, 0, 1], K[:, 0, 1])
    return out


def flip_transform(T: Tensor, flipped: Tensor | None = None) -> Tensor:
    """A rigid transform seen in the mirrored world: ``F · T · F``, ``F = diag(−1, 1, 1, 1)``.

    T: ``(B, 4, 4)``. ``flipped`` (``(B,)`` bool, optional) flips only those samples.
    """
    _check("T", T, (None, 4, 4))
    F = FLIP.to(device=T.device, dtype=T.dtype)
    mirrored = F @ T @ F
    if flipped is None:
        return mirrored
    return torch.where(flipped.to(T.device)[:, None, None], mirrored, T)
