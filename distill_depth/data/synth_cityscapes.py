"""`distill-depth synth --layout cityscapes`: synthetic snippets in the official Cityscapes layout.

The same procedural streets as the KITTI-layout drives (``synth``), seen by a Cityscapes-like
stereo pair: Cityscapes' intrinsics scaled to ``--height × --width`` and its 0.209 m baseline,
mounted where the KITTI rig's camera 2 is. Per split ``SPLIT``, city ``synthN``, snippet ``SEQ``::

    leftImg8bit_sequence/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png    every frame of the snippet
    rightImg8bit_sequence/SPLIT/CITY/CITY_SEQ_FRAME_rightImg8bit.png  every frame
    camera/SPLIT/CITY/CITY_SEQ_000019_camera.json       annotated frame only (official layout)
    disparity/SPLIT/CITY/CITY_SEQ_000019_disparity.png  annotated frame only, p = round(256·d) + 1
    depth_exact/SPLIT/CITY/CITY_SEQ_000019_depth.npy    float32 exact z-depth (synthetic trees only)

The annotated frame is always number 19 (index ``min(19, frames − 2)`` of the snippet, so it has
both neighbours). The disparity is the exact ``baseline · fx / z`` with SGM-like holes: sky,
the left band whose match falls outside the right image, pixels occluded in the right image
(its rendered depth at the match is nearer), and 4% random drop-outs. The bottom fifth of both
images is an ego-car bonnet (flat grey, disparity of a surface 1.5 m away): inside the quarter
every Cityscapes pipeline crops, so a converter that forgets the crop sees it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from distill_depth.data import cityscapes as cs
from distill_depth.data.synth_calib import Rig, SynthError
from distill_depth.data.synth_scene import build_scene, trajectory
from distill_depth.data.synth_sensors import render_camera

NATIVE_HW = (1024, 2048)
NATIVE = cs.Camera(fx=2262.52, fy=2265.3017905988554, u0=1096.98, v0=513.137, baseline=0.209313)
"""Intrinsics and baseline of a typical official camera JSON (aachen), at 2048×1024."""
DEFAULT_HEIGHT, DEFAULT_WIDTH = 128, 256
ANNOTATED = 19
BONNET_DEPTH = 1.5
DROPOUT = 0.04


def scaled_camera(height: int, width: int) -> cs.Camera:
    sx, sy = width / NATIVE_HW[1], height / NATIVE_HW[0]
    return cs.Camera(NATIVE.fx * sx, NATIVE.fy * sy, (NATIVE.u0 + 0.5) * sx - 0.5, (NATIVE.v0 + 0.5) * sy - 0.5,
                     NATIVE.baseline)


def bonnet_rows(height: int) -> int:
    """First row of the ego-car band (the bottom fifth)."""
    return height - height // 5


def sgm_disparity(depth_left: np.ndarray, depth_right: np.ndarray, camera: cs.Camera,
                  rng: np.random.Generator) -> np.ndarray:
    """Exact disparity where a stereo matcher would find one; 0 in its holes."""
    height, width = depth_left.shape
    valid = depth_left > 0
    disparity = np.where(valid, camera.baseline * camera.fx / np.where(valid, depth_left, 1.0), 0.0)
    cols = np.arange(width)[None, :].repeat(height, 0)
    match = np.round(cols - disparity).astype(np.int64)
    inside = match >= 0
    seen = depth_right[np.arange(height)[:, None], match.clip(0, width - 1)]
    occluded = (seen > 0) & (seen < 0.97 * depth_left)  # something nearer hides the point from the right camera
    keep = valid & inside & ~occluded & (rng.random((height, width)) >= DROPOUT)
    return np.where(keep, disparity, 0.0)


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _camera_json(camera: cs.Camera) -> str:
    return json.dumps({"extrinsic": {"baseline": camera.baseline, "pitch": 0.0, "roll": 0.0, "yaw": 0.0,
                                     "x": 1.7, "y": 0.0, "z": 1.2},
                       "intrinsic": {"fx": camera.fx, "fy": camera.fy, "u0": camera.u0, "v0": camera.v0}}, indent=4)


def generate_snippet(root: Path, split: str, city: str, seq: int, frames: int, seed: int,
                     height: int, width: int) -> list[cs.Frame]:
    """Render one snippet; returns its frames (the annotated one is number 19)."""
    rng = np.random.default_rng([int(seed), 7919, int(seq), sum(map(ord, city))])
    velo_poses = trajectory(rng, frames)
    scene = build_scene(rng, x_start=-120.0, x_end=float(velo_poses[-1, 0, 3]) + 300.0)
    camera = scaled_camera(height, width)
    K = camera.K()
    left_from_velo = Rig(height, width).T_velo_from_camera(2)
    right_offset = np.eye(4)
    right_offset[0, 3] = camera.baseline
    annotated = min(ANNOTATED, frames - 2)
    band = bonnet_rows(height)
    out = []
    for index in range(frames):
        frame = cs.Frame(split, city, seq, ANNOTATED - annotated + index)
        pose_left = velo_poses[index] @ left_from_velo
        image_l, depth_l = render_camera(scene, pose_left, K, height, width)
        image_r, depth_r = render_camera(scene, pose_left @ right_offset, K, height, width)
        for image, path in ((image_l, cs.left_path(root, frame)), (image_r, cs.right_path(root, frame))):
            pixels = np.round(image * 255.0).astype(np.uint8)
            pixels[band:] = (52, 54, 58)  # the bonnet
            _png(path, pixels)
        if index == annotated:
            disparity = sgm_disparity(depth_l, depth_r, camera, rng)
            disparity[band:] = camera.baseline * camera.fx / BONNET_DEPTH
            depth_l = depth_l.copy()
            depth_l[band:] = BONNET_DEPTH
            _png(cs.disparity_path(root, frame), cs.encode_disparity(disparity))
            cs.camera_path(root, frame).parent.mkdir(parents=True, exist_ok=True)
            cs.camera_path(root, frame).write_text(_camera_json(camera))
            exact = exact_depth_path(root, frame)
            exact.parent.mkdir(parents=True, exist_ok=True)
            np.save(exact, depth_l.astype(np.float32))
        out.append(frame)
    return out


def exact_depth_path(root: Path, frame: cs.Frame) -> Path:
    return Path(root) / "depth_exact" / frame.split / frame.city / f"{frame.name}_depth.npy"


def generate(out: str | Path, split: str = "train", cities: int = 1, sequences: int = 2, frames: int = 30,
             seed: int = 0, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
             overwrite: bool = False) -> list[cs.Frame]:
    """Write ``cities × sequences`` snippets of ``frames`` frames under ``out``; returns every frame."""
    for name, value, low in (("cities", cities, 1), ("sequences", sequences, 1), ("frames", frames, 3),
                             ("height", height, 8), ("width", width, 8)):
        if int(value) != value or value < low:
            raise SynthError(f"--{name} must be an integer >= {low}, got {value!r}")
    if split not in cs.SPLITS:
        raise SynthError(f"--split must be one of {', '.join(cs.SPLITS)}, got {split!r}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise SynthError(f"--out {out} exists and is not a folder")
    existing = root / "leftImg8bit_sequence" / split
    if existing.exists():
        if not overwrite:
            raise SynthError(f"{existing} already exists; pass --overwrite to replace it (or choose another --out)")
        for folder in ("leftImg8bit_sequence", "rightImg8bit_sequence", "camera", "disparity", "depth_exact"):
            shutil.rmtree(root / folder / split, ignore_errors=True)
    written = []
    for c in range(cities):
        for s in range(sequences):
            written += generate_snippet(root, split, f"synth{c}", s, frames, seed, height, width)
    return written
