"""Procedural road scene (ground plane + axis-aligned boxes) and exact ray casting against it.

Scene frame: x along the road, y left, z up, the road surface is z = 0. Everything is static, so
two views of the scene are related exactly by their poses (photometric consistency holds up to
the pixel-footprint filtering of the texture and occlusions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from distill_depth.data import synth_texture as tex
from distill_depth.data.synth_calib import VELO_HEIGHT, rotation_xyz

BUILDING, CAR, GLASS, POLE, CRATE = range(5)
GROUND, NOTHING = -1, -2
LANE_HALF_WIDTH = 3.5  # two 3.5 m driving lanes; parking strips beyond, up to road_half_width
SKY_HORIZON = np.array([0.78, 0.84, 0.9])
SKY_ZENITH = np.array([0.42, 0.58, 0.84])
FOG_DISTANCE = 140.0  # Gaussian fog: colour → horizon colour as exp(−(range / FOG_DISTANCE)²)


@dataclass
class Scene:
    box_min: np.ndarray  # (N, 3)
    box_max: np.ndarray  # (N, 3)
    kind: np.ndarray  # (N,) int
    colour: np.ndarray  # (N, 3) base albedo
    salt: np.ndarray  # (N,) int, texture seed per object
    road_half_width: float
    sidewalk_width: float
    ground_salt: int
    sun: np.ndarray  # (3,) unit vector towards the sun
    # Failure modes (``synth_failures``); None = off, and the scene renders exactly as without them.
    offset: np.ndarray | None = None  # (N, 3) each box's displacement since frame 0 (moving objects)
    moving: np.ndarray | None = None  # (N,) bool, boxes that move in the world
    uniform: np.ndarray | None = None  # (N,) bool, boxes with a uniform (textureless) albedo
    road_patches: np.ndarray | None = None  # (P, 2) x-intervals of uniform (textureless) road

    @functools.cached_property
    def corners(self) -> np.ndarray:
        """(N, 8, 3) box corners."""
        pick = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=bool)
        return np.where(pick[None], self.box_max[:, None], self.box_min[:, None])


class _BoxList:
    def __init__(self) -> None:
        self.rows: list[tuple[list[float], list[float], int, np.ndarray]] = []

    def add(self, lo: list[float], hi: list[float], kind: int, colour: np.ndarray) -> None:
        self.rows.append((lo, hi, kind, np.asarray(colour, dtype=np.float64)))


FACADE_COLOURS = np.array(
    [[0.8, 0.72, 0.6], [0.7, 0.45, 0.35], [0.85, 0.85, 0.8], [0.6, 0.62, 0.66], [0.9, 0.8, 0.55], [0.55, 0.5, 0.45]]
)
CAR_COLOURS = np.array(
    [[0.8, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.15, 0.15, 0.15], [0.5, 0.55, 0.6], [0.2, 0.5, 0.25]]
)


def build_scene(rng: np.random.Generator, x_start: float, x_end: float) -> Scene:
    """Street with façades, a second row of buildings, parked cars, poles and crates on x ∈ [x_start, x_end]."""
    road = float(rng.uniform(5.6, 6.4))
    sidewalk = float(rng.uniform(2.5, 4.0))
    boxes = _BoxList()
    for side in (1.0, -1.0):

        def span(near: float, far: float) -> tuple[float, float]:
            return (min(side * near, side * far), max(side * near, side * far))

        x = x_start
        while x < x_end:  # front row of façades, with occasional gaps
            if rng.random() < 0.3:
                x += rng.uniform(2.0, 10.0)
                continue
            length, depth, height = rng.uniform(8, 30), rng.uniform(8, 14), rng.uniform(5, 24)
            near = road + sidewalk + rng.uniform(0.0, 3.0)
            y0, y1 = span(near, near + depth)
            colour = FACADE_COLOURS[rng.integers(len(FACADE_COLOURS))] * rng.uniform(0.8, 1.15)
            boxes.add([x, y0, 0.0], [x + length, y1, height], BUILDING, colour)
            x += length
        x = x_start
        while x < x_end:  # back row, seen through the gaps
            length, height = rng.uniform(20, 50), rng.uniform(10, 35)
            near = road + sidewalk + 20.0 + rng.uniform(0, 5)
            y0, y1 = span(near, near + 15.0)
            colour = FACADE_COLOURS[rng.integers(len(FACADE_COLOURS))] * rng.uniform(0.7, 1.0)
            boxes.add([x, y0, 0.0], [x + length, y1, height], BUILDING, colour)
            x += length
        x = x_start
        while x < x_end:  # parked cars: body + glass cabin
            x += rng.uniform(1.5, 12.0)
            if rng.random() < 0.3:
                x += rng.uniform(5.0, 15.0)
                continue
            length, width = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9)
            centre = road - 1.2 + rng.uniform(-0.2, 0.2)
            y0, y1 = span(centre - width / 2, centre + width / 2)
            colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
            boxes.add([x, y0, 0.3], [x + length, y1, 1.05], CAR, colour)
            inset = length * rng.uniform(0.2, 0.3)
            boxes.add([x + inset, y0 + 0.1, 1.05], [x + length - inset * 0.8, y1 - 0.1, 1.5], GLASS, colour)
            x += length
        x = x_start + rng.uniform(0, 20)
        while x < x_end:  # poles at the kerb
            height = rng.uniform(3.5, 6.0)
            y0, y1 = span(road + 0.4, road + 0.62)
            boxes.add([x, y0, 0.0], [x + 0.22, y1, height], POLE, np.array([0.6, 0.6, 0.62]))
            x += rng.uniform(12.0, 30.0)
        x = x_start + rng.uniform(0, 20)
        while x < x_end:  # crates / bins on the sidewalk
            size = rng.uniform(0.5, 1.2, size=3)
            near = road + rng.uniform(1.0, max(1.1, sidewalk - size[1] - 0.2))
            y0, y1 = span(near, near + size[1])
            colour = np.array([0.62, 0.45, 0.28]) * rng.uniform(0.7, 1.2)
            boxes.add([x, y0, 0.0], [x + size[0], y1, size[2]], CRATE, colour)
            x += rng.uniform(8.0, 40.0)
    lo, hi, kind, colour = zip(*boxes.rows)
    sun = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.6, 0.6), 0.8])
    return Scene(
        box_min=np.array(lo),
        box_max=np.array(hi),
        kind=np.array(kind),
        colour=np.clip(np.array(colour), 0.0, 1.0),
        salt=rng.integers(0, 2**30, size=len(kind)),
        road_half_width=road,
        sidewalk_width=sidewalk,
        ground_salt=int(rng.integers(0, 2**30)),
        sun=sun / np.linalg.norm(sun),
    )


def trajectory(rng: np.random.Generator, frames: int) -> np.ndarray:
    """(frames, 4, 4) Velodyne poses in the scene frame: forward at ~0.7–1.2 m/frame, weaving in the lane."""
    k = np.arange(frames)
    speed = rng.uniform(0.7, 1.2) * (1.0 + 0.1 * np.sin(2 * np.pi * k / rng.uniform(30, 80) + rng.uniform(0, 6.3)))
    x = np.concatenate([[0.0], np.cumsum(speed[:-1])])
    amplitude, period, phase = rng.uniform(0.3, 0.8), rng.uniform(40.0, 120.0), rng.uniform(0, 2 * np.pi)
    lane_centre = -LANE_HALF_WIDTH / 2
    y = lane_centre + amplitude * np.sin(2 * np.pi * x / period + phase)
    yaw = np.arctan(amplitude * 2 * np.pi / period * np.cos(2 * np.pi * x / period + phase))
    pitch = 0.004 * np.sin(k * rng.uniform(0.2, 0.5) + rng.uniform(0, 6.3))
    roll = 0.003 * np.sin(k * rng.uniform(0.2, 0.5) + rng.uniform(0, 6.3))
    z = VELO_HEIGHT + 0.01 * np.sin(k * rng.uniform(0.3, 0.7))
    poses = np.tile(np.eye(4), (frames, 1, 1))
    for i in range(frames):
        poses[i, :3, :3] = rotation_xyz(roll[i], pitch[i], yaw[i])
        poses[i, :3, 3] = (x[i], y[i], z[i])
    return poses


def _safe(directions: np.ndarray) -> np.ndarray:
    """Replace exact zero components so that slab tests never compute 0 · inf."""
    return np.where(np.abs(directions) < 1e-12, 1e-12, directions)


def cast(
    scene: Scene, origin: np.ndarray, directions: np.ndarray, regions: list[tuple[int, slice, slice]], far: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays ``origin + t · directions`` (R, C, 3) with the ground and the boxes.

    ``regions`` lists (box, rows, cols): the part of the ray grid that may hit each box.
    Returns ``t`` (R, C) (inf where nothing is hit at ``t < far``), the object (R, C) (box index,
    GROUND or NOTHING) and the hit face's normal axis (R, C) (0, 1, 2).
    """
    directions = _safe(directions)
    t_ground = -origin[2] / directions[..., 2]
    hit_ground = (t_ground > 0) & (t_ground < far)
    t_best = np.where(hit_ground, t_ground, np.inf)
    obj = np.where(hit_ground, GROUND, NOTHING)
    axis = np.full(t_best.shape, 2, dtype=np.int8)
    inverse = [np.ascontiguousarray(1.0 / directions[..., k]) for k in range(3)]
    # Front to back, skipping boxes that cannot beat any hit already found in their rectangle:
    # along a ray, t ≥ distance(origin, box) / |direction|.
    longest_ray = float(np.sqrt((directions**2).sum(axis=-1)).max())
    gap = np.maximum(np.maximum(scene.box_min - origin, origin - scene.box_max), 0.0)
    t_lower = np.linalg.norm(gap, axis=1) / longest_ray
    for box, rows, cols in sorted(regions, key=lambda region: t_lower[region[0]]):
        if t_lower[box] >= t_best[rows, cols].max():
            continue
        # Slab test, one axis at a time on 2-D arrays (faster than reductions over a last axis of 3).
        entry, leave, entry_axis = None, None, None
        for k in range(3):
            inv = inverse[k][rows, cols]
            t1 = (scene.box_min[box, k] - origin[k]) * inv
            t2 = (scene.box_max[box, k] - origin[k]) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            if entry is None:
                entry, leave, entry_axis = lo, hi, np.zeros(lo.shape, dtype=np.int8)
            else:
                later = lo > entry
                entry = np.where(later, lo, entry)
                entry_axis[later] = k
                leave = np.minimum(leave, hi)
        best = t_best[rows, cols]
        closer = (entry <= leave) & (entry > 0) & (entry < best) & (entry < far)
        if not closer.any():
            continue
        best[closer] = entry[closer]
        obj[rows, cols][closer] = box
        axis[rows, cols][closer] = entry_axis[closer]
    return t_best, obj, axis


def surface_albedo(
    scene: Scene, points: np.ndarray, obj: np.ndarray, axis: np.ndarray, footprint: np.ndarray
) -> np.ndarray:
    """Albedo (n, 3) at hit points (n, 3) on objects ``obj`` (n,) with face normal axes (n,)."""
    albedo = np.zeros((len(points), 3))
    ground = obj == GROUND
    if ground.any():
        albedo[ground] = tex.ground_albedo(
            points[ground, 0], points[ground, 1], footprint[ground], scene.road_half_width, scene.sidewalk_width,
            scene.ground_salt,
        )
        if scene.road_patches is not None and len(scene.road_patches):
            coverage = tex.road_patch_coverage(
                points[ground, 0], points[ground, 1], footprint[ground], scene.road_patches, scene.road_half_width
            )
            albedo[ground] = tex.mix(albedo[ground], tex.UNIFORM_ROAD_ALBEDO, coverage)
    on_box = np.flatnonzero(obj >= 0)
    if len(on_box) == 0:
        return albedo
    box = obj[on_box]
    p, a = box_coordinates(scene, points[on_box], box), axis[on_box]
    s, v = face_coordinates(p, a)
    fp, salt, base = footprint[on_box], scene.salt[box], scene.colour[box]
    kind = scene.kind[box]
    for value, shade in (
        (BUILDING, lambda m: tex.facade_albedo(s[m], v[m], fp[m], base[m], salt[m])),
        (CAR, lambda m: tex.car_albedo(s[m], v[m], fp[m], base[m], salt[m])),
        (GLASS, lambda m: tex.glass_albedo(s[m], v[m], fp[m], salt[m])),
        (POLE, lambda m: tex.pole_albedo(s[m], v[m], fp[m], salt[m])),
        (CRATE, lambda m: tex.crate_albedo(s[m], v[m], fp[m], base[m], salt[m])),
    ):
        mask = kind == value
        if mask.any():
            albedo[on_box[mask]] = shade(mask)
    if scene.uniform is not None:
        flat = scene.uniform[box]
        albedo[on_box[flat]] = base[flat] * tex.UNIFORM_FACADE_SHADE
    return albedo


def face_coordinates(points: np.ndarray, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Texture coordinates (n,), (n,) on box faces with normal ``axis`` (n,): along the face, then vertical
    (or the second horizontal coordinate on roofs)."""
    return np.where(axis == 0, points[:, 1], points[:, 0]), np.where(axis == 2, points[:, 1], points[:, 2])


def box_coordinates(scene: Scene, points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Hit points (n, 3) on boxes ``box`` (n,) in the boxes' frame-0 position, where their texture is defined.

    A moving object's texture moves with it; static boxes (and scenes without moving objects) are unchanged."""
    return points if scene.offset is None else points - scene.offset[box]


def surface_reflectance(scene: Scene, points: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """LiDAR reflectance (n,) in [0, 1]: a per-material constant (asphalt dark, glass low, paint bright)."""
    lateral = np.abs(points[:, 1])
    on_sidewalk = lateral < scene.road_half_width + scene.sidewalk_width
    ground = np.where(lateral < scene.road_half_width, 0.12, np.where(on_sidewalk, 0.3, 0.45))
    per_box = np.select(
        [scene.kind == GLASS, scene.kind == POLE],
        [np.full(len(scene.kind), 0.05), np.full(len(scene.kind), 0.6)],
        0.2 + 0.5 * scene.colour.mean(axis=1),
    )
    return np.where(obj >= 0, per_box[np.maximum(obj, 0)], ground)


def normals(directions: np.ndarray, obj: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """(n, 3) outward unit normals of the hit faces (facing the ray)."""
    normal = np.zeros_like(directions)
    rows = np.arange(len(directions))
    normal[rows, axis] = -np.sign(directions[rows, axis])
    normal[obj == GROUND] = (0.0, 0.0, 1.0)
    return normal


def sky_colour(unit_directions: np.ndarray) -> np.ndarray:
    elevation = np.clip(unit_directions[:, 2] * 3.0, 0.0, 1.0)
    return tex.mix(SKY_HORIZON, SKY_ZENITH, elevation)
