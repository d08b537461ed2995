"""Analytic ray-cast renderer for geometry tests: a textured slanted plane, seen by any camera.

Written independently of ``distill_depth.geometry`` (plain torch linear algebra), so a test that
renders with it checks the package against a second derivation of the same pinhole model.
World frame = the target camera; a camera is given by ``T_world_to_camera`` (X_c = T · X_w).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def make_K(batch: int, height: int, width: int, focal: float | None = None) -> Tensor:
    """Intrinsics (B, 3, 3), 0-based pixel centres, principal point slightly off-centre."""
    f = focal if focal is not None else 0.9 * width
    K = torch.tensor([[f, 0.0, 0.52 * (width - 1)], [0.0, f * 1.02, 0.47 * (height - 1)], [0.0, 0.0, 1.0]])
    return K.repeat(batch, 1, 1)


def rigid(rx: float, ry: float, rz: float, tx: float, ty: float, tz: float) -> Tensor:
    """A 4×4 transform from Euler angles (radians, applied z·y·x) and a translation."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    Ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    Rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = Rz @ Ry @ Rx
    T[:3, 3] = torch.tensor([tx, ty, tz], dtype=torch.float64)
    return T


def texture(points: Tensor) -> Tensor:
    """Smooth RGB texture of world points (..., 3) → (..., 3) in [0, 1] (periods of metres)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    r = 0.5 + 0.22 * torch.sin(2.1 * x + 0.3) + 0.2 * torch.cos(1.7 * y)
    g = 0.5 + 0.25 * torch.sin(1.3 * x - 1.1 * y + 0.5 * z)
    b = 0.5 + 0.2 * torch.cos(1.9 * y + 0.4 * x) + 0.15 * torch.sin(0.9 * z)
    return torch.stack([r, g, b], dim=-1).clamp(0, 1)


def render_plane(
    K: Tensor,
    T_world_to_camera: Tensor,
    height: int,
    width: int,
    normal: tuple[float, float, float] = (0.0, -0.25, -1.0),
    offset: float = -8.0,
    mirror: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Image (B, 3, H, W) and depth (B, 1, H, W) of the plane n·X = offset (world frame).

    The default plane faces the camera, about 8 m away, tilted so that depth varies with rows.
    ``mirror`` (B,) bool renders those samples in the mirrored world X → (−x, y, z) (plane and
    texture mirrored; the camera pose is given in the mirrored world).
    """
    K64 = K.double()
    B = K.shape[0]
    T = T_world_to_camera.double()
    if T.ndim == 2:
        T = T.expand(B, 4, 4)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)  # (N, 3)
    rays_c = torch.einsum("bij,nj->bni", torch.linalg.inv(K64), pix)  # z = 1 in the camera
    R, t = T[:, :3, :3], T[:, :3, 3]
    origin = -torch.einsum("bji,bj->bi", R, t)  # camera centre in the world
    dirs = torch.einsum("bji,bnj->bni", R, rays_c)
    sign = torch.ones(B, 3, dtype=torch.float64)
    if mirror is not None:
        sign[mirror, 0] = -1.0
    n = torch.tensor(normal, dtype=torch.float64) * sign  # (B, 3)
    lam = (offset - (origin * n).sum(-1))[:, None] / torch.einsum("bni,bi->bn", dirs, n)  # camera z of the hit
    world = (origin[:, None] + lam[..., None] * dirs) * sign[:, None]  # back to the unmirrored texture
    image = texture(world).reshape(B, height, width, 3).permute(0, 3, 1, 2)
    depth = lam.reshape(B, 1, height, width)
    return image.float(), depth.float()
