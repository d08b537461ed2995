"""Procedural surface albedo of the synthetic scene.

The albedo is a deterministic function of the world-space surface point (and the object it lies
on), so the scene is Lambertian and view-independent. A camera pixel integrates the albedo over its
footprint on the surface; we approximate that integral the way mip-mapping does: detail finer than
the footprint fades to its mean and hard edges are smoothed over one footprint. ``footprint=0``
returns the unfiltered albedo (LiDAR reflectance).
"""

from __future__ import annotations

import numpy as np

def _lattice(coord: np.ndarray) -> np.ndarray:
    """Floor of a float array as wrapping uint32 (negative cells wrap; |coord| < 2**31)."""
    return np.floor(coord).astype(np.int32).view(np.uint32)


def _mix32(h: np.ndarray) -> np.ndarray:
    """Avalanche an uint32 array (xorshift-multiply rounds; uint32 products wrap mod 2**32)."""
    h = (h ^ (h >> np.uint32(15))) * np.uint32(2654435761)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(3266489917)
    return h ^ (h >> np.uint32(16))


def _salt32(salt: np.ndarray | int) -> np.ndarray | np.uint32:
    salt = np.asarray(salt, dtype=np.int64)
    if salt.ndim == 0:  # numpy scalars warn on wrap-around, so mix scalars in Python ints
        return np.uint32((int(salt) & 0xFFFFFFFF) * 2246822519 & 0xFFFFFFFF)
    return (salt & 0xFFFFFFFF).astype(np.uint32) * np.uint32(2246822519)


def hash01(ix: np.ndarray, iy: np.ndarray, salt: np.ndarray | int) -> np.ndarray:
    """Lattice cell (float arrays, floored) + salt -> pseudo-random float in [0, 1), same shape."""
    h = _lattice(ix) * np.uint32(374761393) + _lattice(iy) * np.uint32(668265263) + _salt32(salt)
    return _mix32(h) * (1.0 / 4294967296.0)


def value_noise(u: np.ndarray, v: np.ndarray, salt: np.ndarray | int) -> np.ndarray:
    """C1 value noise with unit lattice spacing, values in [0, 1]."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    su, sv = fu * fu * (3.0 - 2.0 * fu), fv * fv * (3.0 - 2.0 * fv)
    hx = _lattice(iu) * np.uint32(374761393)
    hy = _lattice(iv) * np.uint32(668265263) + _salt32(salt)
    step_x, step_y = np.uint32(374761393), np.uint32(668265263)
    scale = 1.0 / 4294967296.0
    a = _mix32(hx + hy) * scale
    b = _mix32(hx + step_x + hy) * scale
    c = _mix32(hx + hy + step_y) * scale
    d = _mix32(hx + step_x + hy + step_y) * scale
    return (a + (b - a) * su) * (1.0 - sv) + (c + (d - c) * su) * sv


def detail_weight(wavelength: float | np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """1 where the pixel footprint resolves ``wavelength`` (λ ≥ 4·fp), fading to 0 at λ ≤ 2·fp."""
    return np.clip(wavelength / np.maximum(2.0 * footprint, 1e-9) - 1.0, 0.0, 1.0)


def fbm(
    u: np.ndarray, v: np.ndarray, wavelengths: tuple[float, ...], salt: np.ndarray | int, footprint: np.ndarray
) -> np.ndarray:
    """Sum of value-noise octaves (zero mean, each in [−0.5, 0.5]) band-limited by the footprint."""
    total = np.zeros_like(u)
    salt = np.asarray(salt)
    for octave, wavelength in enumerate(wavelengths):
        weight = detail_weight(wavelength, footprint)
        resolved = np.flatnonzero(weight > 0)  # octaves finer than the footprint cost nothing
        if len(resolved) == 0:
            continue
        octave_salt = salt * 31 + octave if salt.ndim == 0 else salt[resolved] * 31 + octave
        noise = value_noise(u[resolved] / wavelength, v[resolved] / wavelength, octave_salt) - 0.5
        total[resolved] += noise * weight[resolved]
    return total


def soft_inside(distance_outside: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Coverage of a region given the signed distance to its border (negative inside)."""
    width = np.maximum(footprint, 1e-4)
    return np.clip(0.5 - distance_outside / width, 0.0, 1.0)


def soft_cells(coord: np.ndarray, period: float, lo: float, hi: float, footprint: np.ndarray) -> np.ndarray:
    """Coverage of the repeated interval [lo, hi)·period inside each cell of ``period``.

    Fades to the mean coverage (hi − lo) once the footprint no longer resolves the cells.
    """
    local = coord / period - np.floor(coord / period)
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    distance = (np.abs(local - centre) - half) * period
    coverage = soft_inside(distance, footprint)
    weight = detail_weight(period, footprint)
    return weight * coverage + (1.0 - weight) * (hi - lo)


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colours ``a`` (n, 3) or (3,) and ``b`` by ``t`` (n,)."""
    return a + (b - a) * t[:, None]


# ---- materials: each maps surface coordinates (n,) to albedo (n, 3) --------------------------


def ground_albedo(
    x: np.ndarray, y: np.ndarray, footprint: np.ndarray, road_half_width: float, sidewalk_width: float, salt: int
) -> np.ndarray:
    """Road (asphalt + lane markings) for |y| < road_half_width, paved sidewalk, then grass."""
    lateral = np.abs(y)
    road_cover = soft_inside(lateral - road_half_width, footprint)
    grass_cover = 1.0 - soft_inside(lateral - road_half_width - sidewalk_width, footprint)
    tile_cover = 1.0 - road_cover - grass_cover
    albedo = np.zeros((len(x), 3))
    for cover, material in ((road_cover, _asphalt), (tile_cover, _tiles), (grass_cover, _grass)):
        part = np.flatnonzero(cover > 0)
        if len(part):
            colour = material(x[part], y[part], footprint[part], road_half_width, salt)
            albedo[part] += colour * cover[part, None]
    return albedo


def _asphalt(x: np.ndarray, y: np.ndarray, footprint: np.ndarray, road_half_width: float, salt: int) -> np.ndarray:
    lateral = np.abs(y)
    tone = 0.33 + 0.55 * fbm(x, y, (0.07, 0.2, 0.6, 2.5), salt, footprint)
    asphalt = tone[:, None] * np.array([1.0, 1.0, 1.04])
    # Dashed centre line (3 m on, 6 m off) and solid lines at the edge of the driving lanes.
    centre_line = soft_inside(lateral - 0.08, footprint) * soft_cells(x, 9.0, 0.0, 1.0 / 3.0, footprint)
    lane_edge = soft_inside(np.abs(lateral - (road_half_width - 2.3)) - 0.08, footprint)
    return mix(asphalt, np.array([0.92, 0.92, 0.88]), np.clip(centre_line + lane_edge, 0.0, 1.0))


def _tiles(x: np.ndarray, y: np.ndarray, footprint: np.ndarray, road_half_width: float, salt: int) -> np.ndarray:
    """0.5 m paving tiles, each its own brightness, with dark joints."""
    tone = 0.55 + 0.25 * (hash01(x / 0.5, y / 0.5, salt + 7) - 0.5) * detail_weight(0.5, footprint)
    joints = 1.0 - 0.5 * (1.0 - soft_cells(x, 0.5, 0.06, 1.0, footprint) * soft_cells(y, 0.5, 0.06, 1.0, footprint))
    return (tone * joints + 0.3 * fbm(x, y, (0.05, 0.15), salt + 3, footprint))[:, None] * np.array([1.0, 0.96, 0.9])


def _grass(x: np.ndarray, y: np.ndarray, footprint: np.ndarray, road_half_width: float, salt: int) -> np.ndarray:
    tone = 0.5 + 0.7 * fbm(x, y, (0.06, 0.2, 0.7, 3.0), salt + 5, footprint)
    return tone[:, None] * np.array([0.35, 0.55, 0.22])


def facade_albedo(
    s: np.ndarray, z: np.ndarray, footprint: np.ndarray, base: np.ndarray, salt: np.ndarray
) -> np.ndarray:
    """Plaster/brick façade with a grid of windows (2.6 m columns, 3 m floors)."""
    plaster = (0.85 + 0.9 * fbm(s, z, (0.05, 0.15, 0.5, 2.0), salt, footprint))[:, None] * base
    courses = soft_cells(z, 0.25, 0.0, 0.85, footprint)
    bricks = courses * soft_cells(s + 0.3 * np.floor(z / 0.25), 0.6, 0.0, 0.9, footprint)  # staggered joints
    plaster = plaster * (0.75 + 0.25 * bricks)[:, None]
    window = facade_window(s, z, footprint)
    glass_tone = 0.6 + 0.8 * fbm(s, z, (0.1, 0.4), salt + 11, footprint)
    glass = glass_tone[:, None] * np.array([0.18, 0.24, 0.33])
    return mix(plaster, glass, window)


def facade_window(s: np.ndarray, z: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Window coverage (n,) in [0, 1] of a façade: 2.6 m columns, 3 m floors, none at street level.

    ``footprint=0`` gives the hard 0/1 mask (where a LiDAR beam meets glass)."""
    window = soft_cells(s, 2.6, 0.25, 0.75, footprint) * soft_cells(z - 0.5, 3.0, 0.35, 0.8, footprint)
    return window * soft_inside(1.2 - z, footprint)


def car_albedo(s: np.ndarray, z: np.ndarray, footprint: np.ndarray, base: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Painted body with panel lines and dirt."""
    paint = (0.9 + 0.6 * fbm(s, z, (0.04, 0.12, 0.4), salt, footprint))[:, None] * base
    panels = soft_cells(s, 1.1, 0.04, 1.0, footprint)
    return paint * (0.55 + 0.45 * panels)[:, None]


def glass_albedo(s: np.ndarray, z: np.ndarray, footprint: np.ndarray, salt: np.ndarray) -> np.ndarray:
    tone = 0.5 + 0.9 * fbm(s, z, (0.05, 0.15, 0.5), salt, footprint)
    return tone[:, None] * np.array([0.2, 0.25, 0.3])


def pole_albedo(s: np.ndarray, z: np.ndarray, footprint: np.ndarray, salt: np.ndarray) -> np.ndarray:
    bands = soft_cells(z, 0.8, 0.0, 0.5, footprint)
    tone = 0.45 + 0.2 * bands + 0.5 * fbm(s, z, (0.03, 0.1, 0.3), salt, footprint)
    return tone[:, None] * np.array([0.9, 0.9, 0.95])


def crate_albedo(
    s: np.ndarray, z: np.ndarray, footprint: np.ndarray, base: np.ndarray, salt: np.ndarray
) -> np.ndarray:
    """Wooden planks: horizontal boards with grain."""
    boards = soft_cells(z, 0.18, 0.08, 1.0, footprint)
    grain = fbm(s, z, (0.04, 0.12, 0.4), salt, footprint)
    return ((0.6 + 0.4 * boards + 0.8 * grain)[:, None]) * base


# ---- textureless surfaces (``synth --textureless``) ------------------------------------------

UNIFORM_ROAD_ALBEDO = np.array([0.33, 0.33, 0.343])  # the asphalt's mean tone, without noise or markings
UNIFORM_FACADE_SHADE = 0.85  # a uniform façade is its base colour times the plaster's mean tone


def road_patch_coverage(
    x: np.ndarray, y: np.ndarray, footprint: np.ndarray, patches: np.ndarray, road_half_width: float
) -> np.ndarray:
    """Coverage (n,) in [0, 1] of uniform road patches: x-intervals ``patches`` (P, 2) across the whole road."""
    coverage = np.zeros(len(x))
    for start, stop in patches:
        coverage = np.maximum(coverage, soft_inside(np.maximum(start - x, x - stop), footprint))
    return coverage * soft_inside(np.abs(y) - road_half_width, footprint)
