"""`make-shards --dataset cityscapes`: an official Cityscapes tree → the same shards as KITTI.

One sample per target frame ``t`` (key ``CITY_SEQ_FRAME``): ``rgb.jpg`` (t), ``prev.jpg`` /
``next.jpg`` (t − k, t + k; ``--frame-offset k``, default 1), ``stereo.jpg`` (``--stereo``: the
right image of t), ``depth.png`` and ``gt.png`` (both depth from the disparity map, only on frames
that have one: the annotated frame of each snippet), ``json``. Every image loses its bottom
quarter (ego car) before it is resized (default 512×192); K follows. ``gt.png`` is stored at the
output size, or with ``--gt-full-res`` at the cropped native size (768×2048: ManyDepth's
evaluation resolution). Frames without a disparity map are skipped and counted, or with
``--keep-unlabelled`` written without ``depth.png``/``gt.png`` (json ``"labelled": false``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_depth.data import cityscapes as cs
from distill_depth.data.cityscapes import CityscapesDataError, Frame
from distill_depth.data.kitti import DEPTH_PNG_SCALE, KittiDataError
from distill_depth.data.shard_reader import sha256_file
from distill_depth.data.shard_writer import (
    ShardOptions, encode_jpeg, encode_png16, manifest_for, print_summary, resample_depth, write_jobs, write_json_atomic,
)

DEFAULT_HW = (192, 512)
SNIPPET_BEFORE, SNIPPET_AFTER = 19, 10  # a 30-frame snippet spans annotated frame F − 19 .. F + 10
MAX_STORED_DEPTH = 65535 / DEPTH_PNG_SCALE
SKIP_REASONS = {
    "no_neighbours": "frame t-k or t+k missing in leftImg8bit_sequence (first/last frames of a snippet)",
    "no_disparity": "no disparity/SPLIT/CITY/NAME_disparity.png (only annotated frames have one)",
}


@dataclass(frozen=True)
class CityscapesJob:
    """Everything one sample needs, paths resolved at planning time."""

    frame: Frame
    root: str
    camera_json: str
    offset: int
    missing: tuple[str, ...] = ()
    labelled: bool = True
    gt_full_res: bool = False

    @property
    def key(self) -> str:
        return self.frame.key

    def encode(self, options: ShardOptions) -> dict[str, bytes]:
        return encode_sample(self, options)


# ---------------------------------------------------------------------------------------------
# choosing frames


def frames_of_split(root: Path, split: str) -> list[Frame]:
    folder = root / "leftImg8bit_sequence" / split
    if not folder.is_dir():
        raise CityscapesDataError(f"{folder}: folder not found (from leftImg8bit_sequence_trainvaltest.zip)")
    suffix = "_leftImg8bit.png"
    frames = [cs.parse_frame_name(p.name[: -len(suffix)], split, str(p))
              for p in sorted(folder.glob(f"*/*{suffix}"))]
    if not frames:
        raise CityscapesDataError(f"{folder}: no CITY/*{suffix} image")
    return frames


def frames_of_file(root: Path, path: Path) -> list[Frame]:
    """The frames of a split file, each found in the split folder that holds it."""
    frames = []
    for city, name, line_no in cs.read_split_file(path):
        found = [split for split in cs.SPLITS
                 if cs.left_path(root, cs.parse_frame_name(name, split, str(path))).is_file()]
        if not found:
            tried = root / "leftImg8bit_sequence" / "{train,val,test}" / city / f"{name}_leftImg8bit.png"
            raise CityscapesDataError(f"{path}:{line_no}: frame {name} not found ({tried} does not exist)")
        frames.append(cs.parse_frame_name(name, found[0], str(path)))
    return frames


def snippet_cameras(root: Path, frames: list[Frame]) -> dict[tuple[str, str, int], list[int]]:
    """``(split, city, seq)`` → annotated frame numbers that have a camera JSON."""
    cameras: dict[tuple[str, str, int], list[int]] = {}
    for split, city in sorted({(f.split, f.city) for f in frames}):
        for path in sorted((root / "camera" / split / city).glob("*_camera.json")):
            frame = cs.parse_frame_name(path.name[: -len("_camera.json")], split, str(path))
            cameras.setdefault((split, city, frame.seq), []).append(frame.frame)
    return cameras


def camera_for(root: Path, frame: Frame, cameras: dict) -> Path:
    """The camera JSON of ``frame``'s snippet (annotated frame F with F − 19 ≤ t ≤ F + 10)."""
    annotated = [F for F in cameras.get((frame.split, frame.city, frame.seq), [])
                 if F - SNIPPET_BEFORE <= frame.frame <= F + SNIPPET_AFTER]
    if not annotated:
        if cs.disparity_path(root, frame).is_file():  # an annotated frame: its own JSON is the one
            expected = cs.camera_path(root, frame)
        else:
            expected = cs.camera_path(root, Frame(frame.split, frame.city, frame.seq, 0)).with_name(
                f"{frame.city}_{frame.seq:06d}_F_camera.json (F within {frame.frame - SNIPPET_AFTER}.."
                f"{frame.frame + SNIPPET_BEFORE})")
        raise CityscapesDataError(f"{expected}: camera JSON not found for {frame.name} "
                                  "(camera_trainvaltest.zip unpacked into --root?)")
    nearest = min(annotated, key=lambda F: abs(F - frame.frame))
    return cs.camera_path(root, Frame(frame.split, frame.city, frame.seq, nearest))


def plan_frames(root: Path, frames: list[Frame], *, offset: int, stereo: bool, keep_edge_frames: bool,
                keep_unlabelled: bool, gt_full_res: bool) -> tuple[list[CityscapesJob], Counter]:
    cameras = snippet_cameras(root, frames)
    jobs, skipped = [], Counter()
    for frame in frames:
        if not cs.left_path(root, frame).is_file():
            raise CityscapesDataError(f"{cs.left_path(root, frame)}: image not found")
        missing = tuple(name for name, d in (("prev", -offset), ("next", offset))
                        if not cs.left_path(root, frame.offset(d)).is_file())
        if len(missing) == 2 and not keep_edge_frames:  # not a snippet edge: a lone frame
            raise CityscapesDataError(
                f"{cs.left_path(root, frame.offset(-offset))}: missing, and so is frame t+{offset}: "
                f"{frame.name} has no temporal neighbour (use leftImg8bit_sequence, not leftImg8bit; "
                "--keep-edge-frames keeps such frames)")
        if missing and not keep_edge_frames:
            skipped["no_neighbours"] += 1
            continue
        labelled = cs.disparity_path(root, frame).is_file()
        if not labelled and not keep_unlabelled:
            skipped["no_disparity"] += 1
            continue
        if stereo and not cs.right_path(root, frame).is_file():
            raise CityscapesDataError(f"{cs.right_path(root, frame)}: right image not found (--stereo needs "
                                      "rightImg8bit_sequence)")
        jobs.append(CityscapesJob(frame, str(root), str(camera_for(root, frame, cameras)), offset, missing,
                                  labelled, gt_full_res))
    return jobs, skipped


# ---------------------------------------------------------------------------------------------
# encoding one sample


def depth_map(job: CityscapesJob, camera: cs.Camera, full_hw: tuple[int, int]) -> np.ndarray:
    """Depth of the target from its disparity, cropped like the images; 0 invalid or beyond 256 m."""
    path = cs.disparity_path(Path(job.root), job.frame)
    disparity = cs.read_disparity(path)
    if disparity.shape != full_hw:
        raise CityscapesDataError(f"{path}: disparity is {disparity.shape[1]}x{disparity.shape[0]}, "
                                  f"image is {full_hw[1]}x{full_hw[0]}")
    depth = cs.depth_from_disparity(disparity, camera)[: cs.kept_rows(full_hw[0])]
    depth[depth >= MAX_STORED_DEPTH] = 0.0  # tiny disparities: beyond what uint16 m×256 holds, and far past 80 m
    return depth.astype(np.float32)


def encode_sample(job: CityscapesJob, options: ShardOptions) -> dict[str, bytes]:
    root, frame = Path(job.root), job.frame
    camera = cs.read_camera(job.camera_json)
    paths = {"rgb": cs.left_path(root, frame)}
    for name, delta in (("prev", -job.offset), ("next", job.offset)):
        paths[name] = paths["rgb"] if name in job.missing else cs.left_path(root, frame.offset(delta))
    if options.stereo:
        paths["stereo"] = cs.right_path(root, frame)
    images = {name: cs.read_rgb(path) for name, path in paths.items()}
    width, height = images["rgb"].size
    for name, image in images.items():
        if image.size != (width, height):
            raise CityscapesDataError(f"{paths[name]}: {image.size[0]}x{image.size[1]}, target is {width}x{height}")
    cropped_hw = (cs.kept_rows(height), width)
    out_hw = options.out_hw or cropped_hw
    sample = {f"{name}.jpg": encode_jpeg(cs.crop_ego_car(image), out_hw, options.jpeg_quality)
              for name, image in images.items()}
    if job.labelled:
        depth = depth_map(job, camera, (height, width))
        sample["depth.png"] = encode_png16(resample_depth(depth, out_hw))
        sample["gt.png"] = encode_png16(depth if job.gt_full_res else resample_depth(depth, out_hw))
    meta = {
        "dataset": "cityscapes",
        "K": cs.intrinsics(camera, cropped_hw, out_hw).tolist(),
        "baseline_m": camera.baseline,
        "city": frame.city, "seq": frame.seq, "frame": frame.frame, "split": frame.split,
        "frame_offset": job.offset,
        "orig_hw": [height, width],
        "cropped_hw": list(cropped_hw),
    }
    if not job.labelled:
        meta["labelled"] = False
    if job.missing:
        meta["missing_neighbours"] = list(job.missing)
    if options.stereo:  # the right camera sits baseline metres along +x of the left one
        T = np.eye(4)
        T[0, 3] = -camera.baseline
        meta["stereo_T"] = T.tolist()
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


# ---------------------------------------------------------------------------------------------
# command line


def configure_parser(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--frame-offset", type=int, default=None, metavar="K",
                       help="Cityscapes: prev/next are frames t-K and t+K (default 1, adjacent frames at 17 Hz)")
    group.add_argument("--gt-full-res", action="store_true",
                       help="Cityscapes: store gt.png at the cropped native size (768x2048), as the cityscapes "
                            "evaluation protocol reads it; default: the output size")


def make_shards(root: Path, out_dir: Path, frames: list[Frame], *, options: ShardOptions, offset: int,
                samples_per_shard: int, workers: int, split_info: dict, progress: bool = True,
                keep_edge_frames: bool = False, keep_unlabelled: bool = False, gt_full_res: bool = False) -> dict:
    if (out_dir / "manifest.json").exists():
        raise CityscapesDataError(f"{out_dir / 'manifest.json'}: output folder already holds shards; choose another --out")
    jobs, skipped = plan_frames(root, frames, offset=offset, stereo=options.stereo, keep_edge_frames=keep_edge_frames,
                                keep_unlabelled=keep_unlabelled, gt_full_res=gt_full_res)
    if not jobs:
        raise CityscapesDataError(f"{root}: no frame can be written (skipped: {dict(skipped) or 'none'})")
    records = write_jobs(out_dir, jobs, options, samples_per_shard=samples_per_shard, workers=workers, progress=progress)
    entries = (["rgb.jpg", "prev.jpg", "next.jpg"] + (["stereo.jpg"] if options.stereo else [])
               + ["depth.png (labelled samples: depth from disparity)", "gt.png (labelled samples: the same depth)",
                  "json"])
    extra = {"dataset": "cityscapes", "ego_car_crop": "bottom 25% removed before resizing", "frame_offset": offset,
             "gt_resolution": "cropped native" if gt_full_res else "output"}
    manifest = manifest_for(jobs, records, options, entries=entries, split_info=split_info, skipped=skipped,
                            skip_reasons=SKIP_REASONS, extra=extra,
                            resolution=list(options.out_hw) if options.out_hw else "native (cropped)",
                            source={"cityscapes_root": str(root.resolve()),
                                    "tool": "distill-depth make-shards --dataset cityscapes"})
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _frames_and_info(root: Path, split: str) -> tuple[list[Frame], dict]:
    if split in cs.SPLITS:
        return frames_of_split(root, split), {"kind": "folder", "name": split}
    path = Path(split)
    if not path.is_file():
        raise CityscapesDataError(f"--split {split}: neither train/val/test nor a split file")
    frames = frames_of_file(root, path)
    return frames, {"kind": "file", "name": path.name, "path": str(path.resolve()), "sha256": sha256_file(path),
                    "lines": len(frames)}


def run(args: argparse.Namespace) -> int:
    problems = [flag for flag, given in (("--kitti-root", args.kitti_root), ("--drives", args.drives)) if given]
    if problems or args.root is None or args.split is None:
        print(f"error: --dataset cityscapes takes --root and --split (train|val|test|FILE)"
              + (f", not {', '.join(problems)}" if problems else ""), file=sys.stderr)
        return 2
    if (args.height is None) != (args.width is None):
        print("error: give both --height and --width, or neither (512x192)", file=sys.stderr)
        return 2
    offset = 1 if args.frame_offset is None else args.frame_offset
    if offset < 1 or args.samples_per_shard < 1 or not 1 <= args.jpeg_quality <= 100:
        print("error: --frame-offset and --samples-per-shard must be >= 1, --jpeg-quality in 1..100", file=sys.stderr)
        return 2
    root = Path(args.root)
    out_hw = (args.height, args.width) if args.height else DEFAULT_HW
    try:
        if not root.is_dir():
            raise CityscapesDataError(f"--root {root}: folder not found")
        frames, split_info = _frames_and_info(root, args.split)
        manifest = make_shards(root, Path(args.out), frames, options=ShardOptions(str(Path(args.out)), out_hw,
                               args.stereo, args.jpeg_quality), offset=offset, samples_per_shard=args.samples_per_shard,
                               workers=args.workers, split_info=split_info, progress=not args.no_progress,
                               keep_edge_frames=args.keep_edge_frames, keep_unlabelled=args.keep_unlabelled,
                               gt_full_res=args.gt_full_res)
    except (CityscapesDataError, KittiDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(manifest, args.out, SKIP_REASONS, "no disparity map")
    return 0
