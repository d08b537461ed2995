"""Failure modes of the synthetic world (``distill-depth synth`` flags), each off by default.

- moving objects: cars in the adjacent lane with their own constant velocity; every sensor sees
  the scene at the frame's time, so images, LiDAR and dense ground truth agree at each frame and
  only the static-world assumption of photometric (branch U) learning breaks on them;
- LiDAR dropout: no return on glass (car windows, façade windows) except a share of
  "through-window" returns from what lies behind, and none with some probability on dark paint;
- LiDAR range noise: Gaussian along the beam;
- textureless surfaces: some front-row façades and road stretches get a uniform albedo.

Every random choice comes from its own stream (seeded by drive and, for the LiDAR, by frame), so
turning one flag on changes nothing that another flag or the base scene draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from distill_depth.data import synth_scene as sc
from distill_depth.data import synth_texture as tex

THROUGH_WINDOW_SHARE = 0.25  # of the beams meeting glass: return from behind it (the rest: no return)
ROOM_DEPTH_BEHIND_WINDOW = (0.5, 4.0)  # metres behind a façade window where a through-window beam returns
DARK_PAINT_MEAN = 0.25  # car paint whose mean albedo is below this is "very dark"
DARK_PAINT_DROPOUT = 0.6  # probability of no return on very dark paint
TEXTURELESS_FACADE_SHARE = 0.4  # of the front-row façades
ROAD_PATCH_GAP, ROAD_PATCH_LENGTH = (10.0, 50.0), (8.0, 25.0)  # metres along the road


@dataclass(frozen=True)
class FailureModes:
    """What ``distill-depth synth`` breaks in the world; the defaults reproduce the clean world byte for byte."""

    moving_objects: int = 0  # cars driving in the adjacent lane with their own velocity
    lidar_dropout: bool = False  # glass / dark-paint dropout and through-window returns
    lidar_noise: float = 0.0  # Gaussian range noise, standard deviation in metres
    textureless: bool = False  # uniform-albedo façades and road patches
    regions: bool = False  # write the per-pixel region labels even with no failure mode on

    @property
    def writes_regions(self) -> bool:
        return self.regions or self.moving_objects > 0 or self.lidar_dropout or self.lidar_noise > 0 or self.textureless

    @property
    def alters_lidar(self) -> bool:
        return self.lidar_dropout or self.lidar_noise > 0


def stream(seed: int, index: int, name: str, *more: int) -> np.random.Generator:
    """Random stream of one failure mode of one drive (independent of the base scene's)."""
    code = {"moving": 1, "textureless": 2, "lidar": 3}[name]
    return np.random.default_rng([int(seed), int(index), 1000 + code, *map(int, more)])


def add_moving_cars(
    scene: sc.Scene, rng: np.random.Generator, count: int, ego_x_end: float
) -> tuple[sc.Scene, np.ndarray]:
    """Scene with ``count`` cars (body + glass cabin) appended in the adjacent lane; their velocity (N, 3).

    Even-numbered cars drive the ego car's way (0.3–1.6 m/frame, so some overtake it and some are
    overtaken), odd ones come towards it (0.5–1.5 m/frame). Velocities are in the scene frame, in metres
    per frame; static boxes have velocity 0. The boxes are placed at their frame-0 positions."""
    lo, hi, kind, colour, salt, velocity = [], [], [], [], [], []
    for car in range(count):
        same_way = car % 2 == 0
        speed = rng.uniform(0.3, 1.6) if same_way else -rng.uniform(0.5, 1.5)
        x = rng.uniform(6.0, 40.0) if same_way else rng.uniform(20.0, ego_x_end + 60.0)
        length, width = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9)
        centre = sc.LANE_HALF_WIDTH / 2 + rng.uniform(-0.2, 0.2)
        y0, y1 = centre - width / 2, centre + width / 2
        paint = sc.CAR_COLOURS[rng.integers(len(sc.CAR_COLOURS))]
        inset = length * rng.uniform(0.2, 0.3)
        for box_lo, box_hi, box_kind in (
            ([x, y0, 0.3], [x + length, y1, 1.05], sc.CAR),
            ([x + inset, y0 + 0.1, 1.05], [x + length - inset * 0.8, y1 - 0.1, 1.5], sc.GLASS),
        ):
            lo.append(box_lo), hi.append(box_hi), kind.append(box_kind), colour.append(paint)
            salt.append(rng.integers(0, 2**30)), velocity.append([speed, 0.0, 0.0])
    static = len(scene.kind)
    moved = dataclasses.replace(
        scene,
        box_min=np.concatenate([scene.box_min, np.array(lo).reshape(-1, 3)]),
        box_max=np.concatenate([scene.box_max, np.array(hi).reshape(-1, 3)]),
        kind=np.concatenate([scene.kind, np.array(kind, dtype=scene.kind.dtype)]),
        colour=np.concatenate([scene.colour, np.array(colour).reshape(-1, 3)]),
        salt=np.concatenate([scene.salt, np.array(salt, dtype=scene.salt.dtype)]),
        moving=np.arange(static + len(kind)) >= static,
        uniform=None if scene.uniform is None else np.concatenate([scene.uniform, np.zeros(len(kind), bool)]),
    )
    return moved, np.concatenate([np.zeros((static, 3)), np.array(velocity).reshape(-1, 3)])


def scene_at(scene: sc.Scene, velocity: np.ndarray, frame: int) -> sc.Scene:
    """The scene at ``frame``: every box displaced by ``velocity`` (N, 3) × frame (texture moves with it)."""
    offset = velocity * float(frame)
    return dataclasses.replace(scene, box_min=scene.box_min + offset, box_max=scene.box_max + offset, offset=offset)


def make_textureless(scene: sc.Scene, rng: np.random.Generator, x_start: float, x_end: float) -> sc.Scene:
    """Scene where a share of the front-row façades and some road stretches have a uniform albedo."""
    inner_face = np.minimum(np.abs(scene.box_min[:, 1]), np.abs(scene.box_max[:, 1]))
    front_row = (scene.kind == sc.BUILDING) & (inner_face <= scene.road_half_width + scene.sidewalk_width + 3.0)
    uniform = front_row & (rng.random(len(scene.kind)) < TEXTURELESS_FACADE_SHARE)
    patches, x = [], x_start
    while x < x_end:
        x += rng.uniform(*ROAD_PATCH_GAP)
        length = rng.uniform(*ROAD_PATCH_LENGTH)
        patches.append((x, x + length))
        x += length
    return dataclasses.replace(scene, uniform=uniform, road_patches=np.array(patches).reshape(-1, 2))


def glass_surface(scene: sc.Scene, points: np.ndarray, obj: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """(n,) bool: hit points (n, 3) on glass — a GLASS box, or a window of a (textured) façade."""
    glass = np.zeros(len(obj), dtype=bool)
    on_box = np.flatnonzero(obj >= 0)
    box = obj[on_box]
    glass[on_box] = scene.kind[box] == sc.GLASS
    facade = scene.kind[box] == sc.BUILDING
    if scene.uniform is not None:
        facade &= ~scene.uniform[box]
    if facade.any():
        where = on_box[facade]
        s, v = sc.face_coordinates(sc.box_coordinates(scene, points[where], obj[where]), axis[where])
        glass[where] = tex.facade_window(s, v, np.zeros(len(where))) > 0.5
    return glass


def dark_surface(scene: sc.Scene, obj: np.ndarray) -> np.ndarray:
    """(n,) bool: hits on very dark car paint."""
    box = np.maximum(obj, 0)
    return (obj >= 0) & (scene.kind[box] == sc.CAR) & (scene.colour[box].mean(axis=1) < DARK_PAINT_MEAN)


def lidar_returns(
    scene: sc.Scene,
    origin: np.ndarray,
    directions: np.ndarray,
    t: np.ndarray,
    obj: np.ndarray,
    axis: np.ndarray,
    modes: FailureModes,
    rng: np.random.Generator,
    max_range: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply dropout, through-window returns and range noise to clean LiDAR hits.

    Inputs are the clean hits' beam directions (n, 3) (scene frame), ray parameters ``t`` (n,), objects
    and face axes (n,). Returns the new ``t`` (n,), objects (n,) and the mask (n,) of beams that return."""
    t, obj, keep = t.copy(), obj.copy(), np.ones(len(t), dtype=bool)
    if modes.lidar_dropout:
        points = origin + t[:, None] * directions
        glass = glass_surface(scene, points, obj, axis)
        draw = rng.random(len(t))
        through = glass & (draw < THROUGH_WINDOW_SHARE)
        keep &= ~(glass & ~through) & ~(dark_surface(scene, obj) & (draw < DARK_PAINT_DROPOUT))
        on_glass_box = through & (obj >= 0) & (scene.kind[np.maximum(obj, 0)] == sc.GLASS)
        window = through & ~on_glass_box
        t[window] += rng.uniform(*ROOM_DEPTH_BEHIND_WINDOW, size=int(window.sum()))
        if on_glass_box.any():  # the beam crosses the cabin and returns from whatever lies beyond it
            rays = directions[on_glass_box][None]
            gap = np.maximum(np.maximum(scene.box_min - origin, origin - scene.box_max), 0.0)
            others = np.flatnonzero((scene.kind != sc.GLASS) & (np.linalg.norm(gap, axis=1) < max_range))
            every = [(int(b), slice(0, 1), slice(0, rays.shape[1])) for b in others]
            t_behind, obj_behind, _ = sc.cast(scene, origin, rays, every, max_range)
            t[on_glass_box], obj[on_glass_box] = t_behind[0], obj_behind[0]
            keep[on_glass_box] &= np.isfinite(t_behind[0])
    if modes.lidar_noise > 0:
        t = t + rng.normal(0.0, modes.lidar_noise, size=len(t))
    keep &= (t > 0) & (t <= max_range)
    return t, obj, keep
