"""Per-pixel region labels of a synthetic camera frame (bits from ``distill_depth.data.regions``)."""

from __future__ import annotations

import numpy as np

from distill_depth.data import regions
from distill_depth.data import synth_failures as failures
from distill_depth.data import synth_scene as sc
from distill_depth.data import synth_texture as tex
from distill_depth.data.synth_sensors import CameraHits, lidar_elevations


def region_labels(
    scene: sc.Scene, hits: CameraHits, T_scene_velo: np.ndarray, beams: int, focal_y: float
) -> np.ndarray:
    """(H, W) uint8 bitmask of the regions each pixel's surface point lies in (0 on sky).

    - MOVING: on a moving box; TEXTURELESS: on a uniform façade, or on a uniform road patch
      (coverage > ½); NO_RETURN: on glass (``synth_failures.glass_surface``) or very dark paint;
    - ABOVE_TOP_BEAM: the point's elevation seen from the Velodyne is more than half a pixel above the top
      beam's (so no pixel is both above the top beam and on a LiDAR row);
    - ON_LIDAR_ROW: some beam's elevation is within half a pixel (½ / f_y rad) of the point's, i.e.
      a beam sweeps through the pixel (whether or not it returns there).
    """
    height, width = hits.obj.shape
    labels = np.zeros(height * width, dtype=np.uint8)
    hit = np.flatnonzero(np.isfinite(hits.points[..., 0]).ravel())
    points, obj, axis = hits.points.reshape(-1, 3)[hit], hits.obj.ravel()[hit], hits.axis.ravel()[hit]
    on_box, box = obj >= 0, np.maximum(obj, 0)
    bits = np.zeros(len(hit), dtype=np.uint8)
    if scene.moving is not None:
        bits |= np.where(on_box & scene.moving[box], regions.MOVING, 0).astype(np.uint8)
    textureless = np.zeros(len(hit), dtype=bool)
    if scene.uniform is not None:
        textureless |= on_box & scene.uniform[box]
    if scene.road_patches is not None and len(scene.road_patches):
        ground = obj == sc.GROUND
        coverage = tex.road_patch_coverage(
            points[ground, 0], points[ground, 1], np.zeros(int(ground.sum())), scene.road_patches,
            scene.road_half_width,
        )
        textureless[np.flatnonzero(ground)[coverage > 0.5]] = True
    bits |= np.where(textureless, regions.TEXTURELESS, 0).astype(np.uint8)
    no_return = failures.glass_surface(scene, points, obj, axis) | failures.dark_surface(scene, obj)
    bits |= np.where(no_return, regions.NO_RETURN, 0).astype(np.uint8)
    in_velo = (points - T_scene_velo[:3, 3]) @ T_scene_velo[:3, :3]
    elevation = np.arctan2(in_velo[:, 2], np.hypot(in_velo[:, 0], in_velo[:, 1]))
    beam_elevations = lidar_elevations(beams)
    half_pixel = 0.5 / focal_y
    bits |= np.where(elevation > beam_elevations[0] + half_pixel, regions.ABOVE_TOP_BEAM, 0).astype(np.uint8)
    nearest = np.abs(elevation[:, None] - beam_elevations[None]).min(axis=1)
    bits |= np.where(nearest <= half_pixel, regions.ON_LIDAR_ROW, 0).astype(np.uint8)
    labels[hit] = bits
    return labels.reshape(height, width)
