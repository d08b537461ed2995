"""Sensors of the synthetic rig: pinhole cameras and a spinning LiDAR (64 beams, or fewer), by ray casting."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from distill_depth.data import synth_failures as failures
from distill_depth.data import synth_scene as sc
from distill_depth.data.synth_failures import FailureModes

LIDAR_ELEVATIONS_DEG = (2.0, -24.8)  # HDL-64E vertical field of view, the beams evenly spread
DEFAULT_BEAMS = 64
LIDAR_MAX_RANGE = 80.0
CAMERA_FAR = 250.0  # beyond: no depth (uint16 metres×256 tops out at 256 m); the fog hides it
AMBIENT, DIFFUSE = 0.6, 0.55


def _box_distance(scene: sc.Scene, origin: np.ndarray) -> np.ndarray:
    """(N,) distance from ``origin`` to each box (0 inside)."""
    gap = np.maximum(np.maximum(scene.box_min - origin, origin - scene.box_max), 0.0)
    return np.linalg.norm(gap, axis=1)


def camera_regions(
    scene: sc.Scene, T_scene_cam: np.ndarray, K: np.ndarray, height: int, width: int, far: float
) -> list[tuple[int, slice, slice]]:
    """Pixel rectangle of each box that may be visible (exact: a box projects into its corners' hull).

    ``far`` bounds the camera z-depth; boxes further than ``far`` times the longest pixel ray are out.
    """
    origin = T_scene_cam[:3, 3]
    corner_rays = np.array([[0.0, 0.0], [width - 1.0, 0.0], [0.0, height - 1.0], [width - 1.0, height - 1.0]])
    longest = np.sqrt(1.0 + (((corner_rays - K[:2, 2]) / np.diag(K)[:2]) ** 2).sum(axis=1)).max()
    near = np.flatnonzero(_box_distance(scene, origin) < far * longest)
    corners = (scene.corners[near] - origin) @ T_scene_cam[:3, :3]  # (n, 8, 3) camera frame
    z = corners[..., 2]
    ahead = z > 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * corners[..., 0] / z + K[0, 2]
        v = K[1, 1] * corners[..., 1] / z + K[1, 2]
    # Boxes straddling the camera plane get the whole image; boxes entirely behind are dropped.
    straddles = ahead.any(axis=1) & ~ahead.all(axis=1)
    c0 = np.where(straddles, 0, np.clip(np.floor(u.min(axis=1, initial=np.inf, where=ahead)), 0, width))
    c1 = np.where(straddles, width, np.clip(np.ceil(u.max(axis=1, initial=-np.inf, where=ahead)) + 1, 0, width))
    r0 = np.where(straddles, 0, np.clip(np.floor(v.min(axis=1, initial=np.inf, where=ahead)), 0, height))
    r1 = np.where(straddles, height, np.clip(np.ceil(v.max(axis=1, initial=-np.inf, where=ahead)) + 1, 0, height))
    keep = ahead.any(axis=1) & (c0 < c1) & (r0 < r1)
    return [
        (int(box), slice(int(row0), int(row1)), slice(int(col0), int(col1)))
        for box, row0, row1, col0, col1 in zip(near[keep], r0[keep], r1[keep], c0[keep], c1[keep])
    ]


class CameraHits(NamedTuple):
    """What each pixel's ray hit: scene-frame points (H, W, 3) (NaN on sky), object (H, W), face axis (H, W)."""

    points: np.ndarray
    obj: np.ndarray
    axis: np.ndarray


def render_camera(
    scene: sc.Scene, T_scene_cam: np.ndarray, K: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) float in [0, 1] and z-depth (H, W) float metres (0 = sky / beyond CAMERA_FAR).

    Pixel (r, c) looks along the ray through its centre ``((c − cx)/fx, (r − cy)/fy, 1)`` (0-based K).
    """
    image, depth, _ = render_camera_hits(scene, T_scene_cam, K, height, width)
    return image, depth


def render_camera_hits(
    scene: sc.Scene, T_scene_cam: np.ndarray, K: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, CameraHits]:
    """``render_camera``'s image and depth, and what each pixel hit (for the region labels)."""
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays_cam = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones_like(cols)], axis=-1)
    rotation, origin = T_scene_cam[:3, :3], T_scene_cam[:3, 3]
    directions = rays_cam @ rotation.T  # camera z-component 1, so the ray parameter t is the z-depth
    regions = camera_regions(scene, T_scene_cam, K, height, width, CAMERA_FAR)
    t, obj, axis = sc.cast(scene, origin, directions, regions, CAMERA_FAR)

    flat_dirs = directions.reshape(-1, 3)
    ray_length = np.linalg.norm(flat_dirs, axis=1)
    unit = flat_dirs / ray_length[:, None]
    colour = sc.sky_colour(unit)
    hit = np.flatnonzero(np.isfinite(t.ravel()))
    if len(hit):
        t_hit, obj_hit, axis_hit = t.ravel()[hit], obj.ravel()[hit], axis.ravel()[hit]
        points = origin + t_hit[:, None] * flat_dirs[hit]
        normal = sc.normals(unit[hit], obj_hit, axis_hit)
        distance = t_hit * ray_length[hit]
        cosine = np.abs(np.einsum("ij,ij->i", unit[hit], normal))
        # Pixel footprint on the surface (geometric mean of its two axes): range / f across the ray,
        # stretched by 1 / cos(incidence) along the slant.
        footprint = distance / (K[0, 0] * np.sqrt(np.maximum(cosine, 1e-3)))
        albedo = sc.surface_albedo(scene, points, obj_hit, axis_hit, footprint)
        light = AMBIENT + DIFFUSE * np.clip(normal @ scene.sun, 0.0, None)
        fog = 1.0 - np.exp(-((distance / sc.FOG_DISTANCE) ** 2))
        colour[hit] = sc.tex.mix(albedo * light[:, None], colour[hit], fog)
    image = np.clip(colour, 0.0, 1.0).reshape(height, width, 3)
    depth = np.where(np.isfinite(t), t, 0.0)
    points = origin + np.where(np.isfinite(t), t, np.nan)[..., None] * directions
    return image, depth, CameraHits(points, obj, axis)


def lidar_elevations(beams: int = DEFAULT_BEAMS) -> np.ndarray:
    """(beams,) elevations in radians, descending, evenly over the HDL-64E's +2°..−24.8°.

    Fewer beams over the same field of view give a sparser scan (a 16- or 32-beam sensor, as in
    studies of how depth quality falls with LiDAR density)."""
    return np.deg2rad(np.linspace(*LIDAR_ELEVATIONS_DEG, beams))


@functools.lru_cache(maxsize=4)
def lidar_directions(azimuth_steps: int, beams: int = DEFAULT_BEAMS) -> np.ndarray:
    """(beams, A, 3) unit beam directions in the Velodyne frame; azimuth column j at −π + 2π(j + ½)/A."""
    elevation = lidar_elevations(beams)
    azimuth = -np.pi + 2 * np.pi * (np.arange(azimuth_steps) + 0.5) / azimuth_steps
    el, az = np.meshgrid(elevation, azimuth, indexing="ij")
    directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)
    directions.flags.writeable = False
    return directions


def lidar_regions(
    scene: sc.Scene, T_scene_velo: np.ndarray, azimuth_steps: int, max_range: float, beams: int = DEFAULT_BEAMS
) -> list[tuple[int, slice, slice]]:
    """Azimuth columns each box may cover (exact: a convex box's azimuths span its corners')."""
    origin = T_scene_velo[:3, 3]
    near = np.flatnonzero(_box_distance(scene, origin) < max_range)
    corners = (scene.corners[near] - origin) @ T_scene_velo[:3, :3]  # (n, 8, 3) Velodyne frame
    # Elevation bounds from the box's vertical extent and horizontal distance (scene frame),
    # widened by the scanner's tilt w.r.t. the scene's z.
    tilt = np.arccos(np.clip(T_scene_velo[2, 2], -1.0, 1.0)) + 1e-3
    lo, hi = scene.box_min[near] - origin, scene.box_max[near] - origin
    gap = np.maximum(np.maximum(lo[:, :2], -hi[:, :2]), 0.0)
    r_min = np.maximum(np.hypot(gap[:, 0], gap[:, 1]), 1e-6)
    r_max = np.hypot(np.maximum(np.abs(lo[:, 0]), np.abs(hi[:, 0])), np.maximum(np.abs(lo[:, 1]), np.abs(hi[:, 1])))
    el_top = np.arctan2(hi[:, 2], np.where(hi[:, 2] > 0, r_min, r_max)) + tilt
    el_bottom = np.arctan2(lo[:, 2], np.where(lo[:, 2] < 0, r_min, r_max)) - tilt
    elevations = lidar_elevations(beams)  # descending
    first_beam = np.searchsorted(-elevations, -el_top, side="left")  # first beam with elevation <= el_top
    last_beam = np.searchsorted(-elevations, -el_bottom, side="right")  # past the last one >= el_bottom
    # Azimuth interval: a convex box's azimuths (seen from above) span its corners'.
    azimuth = np.arctan2(corners[..., 1], corners[..., 0])
    centre = np.arctan2(corners[..., 1].mean(axis=1), corners[..., 0].mean(axis=1))
    relative = (azimuth - centre[:, None] + np.pi) % (2 * np.pi) - np.pi
    surrounds = relative.max(axis=1) - relative.min(axis=1) > np.pi * 0.9  # scanner (nearly) inside
    scale = azimuth_steps / (2 * np.pi)
    j0 = np.floor((centre + relative.min(axis=1) + np.pi) * scale - 0.5).astype(int) - 1
    j1 = np.ceil((centre + relative.max(axis=1) + np.pi) * scale - 0.5).astype(int) + 2
    j0, j1 = np.where(surrounds, 0, j0), np.where(surrounds, azimuth_steps, j1)
    regions = []
    for box, b0, b1, a0, a1 in zip(near, first_beam, last_beam, j0, j1):
        if b0 >= b1:
            continue
        for wrap in (0, -azimuth_steps, azimuth_steps):  # the interval may cross the ±180° seam
            start, stop = max(a0 + wrap, 0), min(a1 + wrap, azimuth_steps)
            if start < stop:
                regions.append((int(box), slice(int(b0), int(b1)), slice(int(start), int(stop))))
    return regions


def scan_lidar(
    scene: sc.Scene,
    T_scene_velo: np.ndarray,
    azimuth_steps: int,
    max_range: float = LIDAR_MAX_RANGE,
    beams: int = DEFAULT_BEAMS,
    modes: FailureModes | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(n, 4) float32 points x, y, z, reflectance in the Velodyne frame (returns within ``max_range``).

    ``modes`` (with ``rng``) applies LiDAR dropout / through-window returns / range noise."""
    beams_velo = lidar_directions(azimuth_steps, beams)
    directions = beams_velo @ T_scene_velo[:3, :3].T
    origin = T_scene_velo[:3, 3]
    regions = lidar_regions(scene, T_scene_velo, azimuth_steps, max_range, beams)
    t, obj, axis = sc.cast(scene, origin, directions, regions, max_range)
    hit = np.flatnonzero((t <= max_range).ravel())
    t_hit, obj_hit = t.ravel()[hit], obj.ravel()[hit]
    if modes is not None and modes.alters_lidar:
        assert rng is not None, "LiDAR failure modes need a random stream"
        t_hit, obj_hit, keep = failures.lidar_returns(
            scene, origin, directions.reshape(-1, 3)[hit], t_hit, obj_hit, axis.ravel()[hit], modes, rng, max_range
        )
        hit, t_hit, obj_hit = hit[keep], t_hit[keep], obj_hit[keep]
    points_scene = origin + t_hit[:, None] * directions.reshape(-1, 3)[hit]
    reflectance = sc.surface_reflectance(scene, points_scene, obj_hit)
    points_velo = t_hit[:, None] * beams_velo.reshape(-1, 3)[hit]
    return np.concatenate([points_velo, reflectance[:, None]], axis=1).astype(np.float32)
