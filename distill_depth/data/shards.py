"""`distill-depth make-shards`: a KITTI raw tree (real or synthetic) → WebDataset tars + manifest.

One sample per target frame, key ``{drive}_{side}_{frame:010d}``; entries ``rgb.jpg``,
``prev.jpg``, ``next.jpg``, ``stereo.jpg`` (with ``--stereo``), ``depth.png`` (Eigen LiDAR
projection, uint16 metres×256; absent on unlabelled samples, json ``"labelled": false``), ``gt.png``
(when the tree has ``proj_depth/groundtruth``), ``regions.png`` (8-bit region bitmask, bits in
``distill_depth.data.regions``, when the tree has ``proj_depth/regions``) and ``json``. Shards are
written in parallel by ``shard_writer`` (each as ``.tar.tmp`` + fsync + rename, and
``manifest.json`` last, so a folder with a manifest is always complete).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distill_depth.data import kitti, regions
from distill_depth.data.kitti import KittiDataError, SplitEntry
from distill_depth.data.shard_reader import sha256_file
from distill_depth.data.shard_writer import (
    ShardOptions, encode_jpeg, encode_png16, manifest_for, print_summary, resample_depth, write_jobs, write_json_atomic,
)

SKIP_REASONS = {
    "no_neighbours": "frame t-1 or t+1 missing in the camera folder",
    "no_lidar": "no velodyne_points/data/FRAME.bin (no sparse depth to supervise with)",
}


@dataclass(frozen=True)
class FrameJob:
    root: str
    entry: SplitEntry
    missing: tuple[str, ...] = ()  # neighbours replaced by the target (--keep-edge-frames only)
    labelled: bool = True  # False: no velodyne scan, written without depth.png (--keep-unlabelled only)

    @property
    def key(self) -> str:
        return self.entry.key

    def encode(self, options: ShardOptions) -> dict[str, bytes]:
        return encode_sample(self, options)


# ---------------------------------------------------------------------------------------------
# choosing frames


def entries_from_drives(root: Path, pattern: str, sides: str) -> list[SplitEntry]:
    """Every frame of every drive folder matching ``pattern`` (relative to ``root``)."""
    drives = sorted(p for p in glob.glob(str(root / pattern)) if os.path.isdir(p))
    if not drives:
        raise KittiDataError(f"--drives {pattern!r}: no drive folder matches under {root}")
    entries = []
    for drive in drives:
        drive_path = os.path.relpath(drive, root).replace(os.sep, "/")
        if drive_path.count("/") != 1:
            raise KittiDataError(f"{drive}: expected ROOT/DATE/DRIVE, got {drive_path!r}")
        for side in sides:
            camera = kitti.SIDE_TO_CAMERA[side]
            folder = Path(drive) / f"image_0{camera}" / "data"
            if not folder.is_dir():
                raise KittiDataError(f"{folder}: camera folder missing (side {side!r})")
            frames = sorted(int(p.stem) for p in folder.glob("*.png"))
            entries += [SplitEntry(drive_path, frame, side) for frame in frames]
    return entries


def plan_frames(root: Path, entries: list[SplitEntry], stereo: bool,
                where: dict[SplitEntry, str] | None = None,
                keep_edge_frames: bool = False, keep_unlabelled: bool = False) -> tuple[list[FrameJob], Counter]:
    """Jobs for the frames that can be written, and the count of skipped frames per reason.

    A missing drive or target image is an error (the split names something that is not there);
    a frame at the edge of a drive or without a scan is skipped and counted. With
    ``keep_edge_frames`` (evaluation splits: Eigen test holds frame 0 of many drives) a frame
    without a neighbour is kept, the target standing in for the missing neighbour. With
    ``keep_unlabelled`` (semi-supervised training) a frame without a scan becomes an unlabelled
    sample instead of being skipped.
    """
    where = where or {}
    jobs, skipped = [], Counter()
    for entry in entries:
        origin = where.get(entry, f"{entry.drive_path} {entry.frame} {entry.side}")
        if not (root / entry.drive_path).is_dir():
            raise KittiDataError(f"{origin}: drive folder {root / entry.drive_path} not found")
        target = kitti.image_path(root, entry.drive_path, entry.camera, entry.frame)
        if not target.is_file():
            raise KittiDataError(f"{origin}: frame image {target} not found")
        if stereo:
            partner = kitti.image_path(root, entry.drive_path, 5 - entry.camera, entry.frame)
            if not partner.is_file():
                raise KittiDataError(
                    f"{origin}: --stereo needs the stereo partner {partner}, which is missing"
                )
        missing = tuple(name for name, d in (("prev", -1), ("next", 1))
                        if not kitti.image_path(root, entry.drive_path, entry.camera, entry.frame + d).is_file())
        if missing and not keep_edge_frames:
            skipped["no_neighbours"] += 1
        elif kitti.velodyne_path(root, entry.drive_path, entry.frame).is_file():
            jobs.append(FrameJob(str(root), entry, missing))
        elif keep_unlabelled:
            jobs.append(FrameJob(str(root), entry, missing, labelled=False))
        else:
            skipped["no_lidar"] += 1
    return jobs, skipped


# ---------------------------------------------------------------------------------------------
# encoding one sample

_CALIBRATION: dict[str, kitti.DriveCalibration] = {}


def _calibration(date_dir: Path) -> kitti.DriveCalibration:
    key = str(date_dir)
    if key not in _CALIBRATION:
        _CALIBRATION[key] = kitti.load_calibration(date_dir)
    return _CALIBRATION[key]


def encode_sample(job: FrameJob, options: ShardOptions) -> dict[str, bytes]:
    """The tar entries of one target frame."""
    root, entry = Path(job.root), job.entry
    calib = _calibration(root / entry.date)
    camera = entry.camera
    images = {
        name: kitti.read_image(kitti.image_path(
            root, entry.drive_path, camera, entry.frame + (0 if name in job.missing else offset)))
        for name, offset in (("rgb", 0), ("prev", -1), ("next", 1))
    }
    if options.stereo:
        images["stereo"] = kitti.read_image(kitti.image_path(root, entry.drive_path, 5 - camera, entry.frame))
    width, height = images["rgb"].size
    orig_hw = (height, width)
    for name, image in images.items():
        if image.size != (width, height):
            raise KittiDataError(
                f"{entry.drive_path} frame {entry.frame}: {name} image is {image.size[0]}x{image.size[1]}, "
                f"target is {width}x{height}"
            )
    expected = calib.image_size.get(camera)
    if expected is not None and expected != orig_hw:
        raise KittiDataError(
            f"{root / entry.date / 'calib_cam_to_cam.txt'}: S_rect_0{camera} says {expected[1]}x{expected[0]}, "
            f"but {entry.drive_path} frame {entry.frame} is {width}x{height}"
        )
    out_hw = options.out_hw or orig_hw
    sample = {f"{name}.jpg": encode_jpeg(image, out_hw, options.jpeg_quality) for name, image in images.items()}
    if job.labelled:
        scan = kitti.load_velodyne(kitti.velodyne_path(root, entry.drive_path, entry.frame))
        sample["depth.png"] = encode_png16(kitti.project_velodyne(scan, calib, camera, orig_hw, out_hw))
    gt_path = kitti.groundtruth_path(root, entry.drive_path, camera, entry.frame)
    if gt_path.is_file():
        gt = kitti.read_depth_png(gt_path)
        if gt.shape != orig_hw:
            raise KittiDataError(f"{gt_path}: ground truth is {gt.shape[1]}x{gt.shape[0]}, image is {width}x{height}")
        sample["gt.png"] = encode_png16(resample_depth(gt, out_hw))
    labels_path = regions.regions_path(root, entry.drive_path, camera, entry.frame)
    if labels_path.is_file():  # synthetic trees with failure modes: the region bitmask, 8-bit grayscale
        labels = np.asarray(Image.open(labels_path))
        if labels.shape != orig_hw or labels.dtype != np.uint8:
            raise KittiDataError(f"{labels_path}: region labels must be {width}x{height} 8-bit, "
                                 f"got {labels.shape[::-1]} {labels.dtype}")
        buffer = io.BytesIO()
        Image.fromarray(regions.resample_labels(labels, out_hw)).save(buffer, format="PNG")
        sample["regions.png"] = buffer.getvalue()
    meta = {
        "K": kitti.intrinsics(calib, camera, orig_hw, out_hw).tolist(),
        "baseline_m": kitti.stereo_baseline(calib),
        "drive": entry.drive,
        "date": entry.date,
        "frame": entry.frame,
        "side": entry.side,
        "orig_hw": list(orig_hw),
    }
    if not job.labelled:
        meta["labelled"] = False  # absent = labelled, so labelled shards keep their exact bytes
    if job.missing:
        meta["missing_neighbours"] = list(job.missing)  # prev/next.jpg hold the target itself
    if options.stereo:
        meta["stereo_T"] = kitti.stereo_transform(calib, camera, 5 - camera).tolist()
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


# ---------------------------------------------------------------------------------------------
# the command's work (the writing itself: shard_writer)


def make_shards(root: Path, out_dir: Path, entries: list[SplitEntry], *, options: ShardOptions,
                samples_per_shard: int, workers: int, split_info: dict,
                where: dict[SplitEntry, str] | None = None, progress: bool = True,
                keep_edge_frames: bool = False, keep_unlabelled: bool = False) -> dict:
    """Write the shards and the manifest; returns the manifest."""
    if (out_dir / "manifest.json").exists():
        raise KittiDataError(f"{out_dir / 'manifest.json'}: output folder already holds shards; choose another --out")
    jobs, skipped = plan_frames(root, entries, options.stereo, where, keep_edge_frames, keep_unlabelled)
    if not jobs:
        raise KittiDataError(f"{root}: no frame can be written (skipped: {dict(skipped) or 'none'})")
    records = write_jobs(out_dir, jobs, options, samples_per_shard=samples_per_shard, workers=workers,
                         progress=progress)
    entries = (["rgb.jpg", "prev.jpg", "next.jpg"] + (["stereo.jpg"] if options.stereo else [])
               + ["depth.png (labelled samples)", "gt.png (when the source has proj_depth/groundtruth)",
                  "regions.png (uint8 region bitmask, distill_depth.data.regions, when the source has "
                  "proj_depth/regions)", "json"])
    manifest = manifest_for(jobs, records, options, entries=entries, split_info=split_info, skipped=skipped,
                            skip_reasons=SKIP_REASONS, resolution=list(options.out_hw) if options.out_hw else "native",
                            source={"kitti_root": str(root.resolve()), "tool": "distill-depth make-shards"})
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("kitti", "cityscapes"), default="kitti",
                        help="source layout: KITTI raw (default) or official Cityscapes (docs/data.md)")
    parser.add_argument("--kitti-root", help="KITTI: folder holding DATE/calib_*.txt and DATE/DRIVE/")
    parser.add_argument("--root", help="dataset root (same as --kitti-root for KITTI; for Cityscapes the folder "
                                       "holding leftImg8bit_sequence/, camera/, disparity/)")
    parser.add_argument("--out", required=True, help="output folder (must not hold a manifest.json yet)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--split", help="KITTI: split file, lines 'DATE/DRIVE FRAME l|r' (monodepth2 format); "
                                       "Cityscapes: train | val | test (every frame of that folder) or a file of "
                                       "lines 'CITY CITY_SEQ_FRAME' (ManyDepth format)")
    which.add_argument("--drives", help="glob of drive folders relative to --kitti-root (default: */*_sync)")
    parser.add_argument("--sides", default="l", choices=["l", "r", "lr"], help="cameras for --drives (default l)")
    parser.add_argument("--height", type=int, help="stored height (default: native, no resize; Cityscapes 192)")
    parser.add_argument("--width", type=int, help="stored width (default: native, no resize; Cityscapes 512)")
    parser.add_argument("--stereo", action="store_true",
                        help="add stereo.jpg and stereo_T (needs image_03, or Cityscapes' rightImg8bit_sequence)")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--keep-edge-frames", action="store_true",
                        help="evaluation splits: keep frames lacking t-1/t+1 (the target stands in for the "
                             "missing neighbour, json 'missing_neighbours' says which); never for training")
    parser.add_argument("--keep-unlabelled", action="store_true",
                        help="semi-supervised training: frames without a velodyne scan (Cityscapes: without a "
                             "disparity map) become samples without depth.png (json 'labelled': false, counted "
                             "in the manifest's 'unlabelled')")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from distill_depth.data import cityscapes_shards

    cityscapes_shards.configure_parser(parser.add_argument_group("Cityscapes only"))


def run(args: argparse.Namespace) -> int:
    if args.dataset == "cityscapes":
        from distill_depth.data import cityscapes_shards

        return cityscapes_shards.run(args)
    if args.frame_offset is not None or args.gt_full_res:
        print("error: --frame-offset and --gt-full-res are for --dataset cityscapes", file=sys.stderr)
        return 2
    if (args.kitti_root is None) == (args.root is None):
        print("error: give the KITTI root as --kitti-root (or --root), once", file=sys.stderr)
        return 2
    root = Path(args.kitti_root or args.root)
    if (args.height is None) != (args.width is None):
        print("error: give both --height and --width, or neither (native resolution)", file=sys.stderr)
        return 2
    if args.samples_per_shard < 1 or not 1 <= args.jpeg_quality <= 100:
        print("error: --samples-per-shard must be >= 1 and --jpeg-quality in 1..100", file=sys.stderr)
        return 2
    out_hw = (args.height, args.width) if args.height else None
    try:
        if not root.is_dir():
            raise KittiDataError(f"--kitti-root {root}: folder not found")
        where = {}
        if args.split:
            entries = kitti.read_split_file(args.split)
            where = {e: f"{args.split}:{i + 1}" for i, e in enumerate(entries)}
            split_info = {"kind": "file", "name": Path(args.split).name, "path": str(Path(args.split).resolve()),
                          "sha256": sha256_file(Path(args.split)), "lines": len(entries)}
        else:
            pattern = args.drives or "*/*_sync"
            entries = entries_from_drives(root, pattern, args.sides)
            split_info = {"kind": "drives", "glob": pattern, "sides": args.sides}
        options = ShardOptions(str(Path(args.out)), out_hw, args.stereo, args.jpeg_quality)
        manifest = make_shards(root, Path(args.out), entries, options=options,
                               samples_per_shard=args.samples_per_shard, workers=args.workers,
                               split_info=split_info, where=where, progress=not args.no_progress,
                               keep_edge_frames=args.keep_edge_frames, keep_unlabelled=args.keep_unlabelled)
    except KittiDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(manifest, args.out, SKIP_REASONS, "no LiDAR scan")
    return 0
