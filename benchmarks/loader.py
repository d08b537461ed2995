"""Loader throughput: our shard stream vs the common folder loader, over the same real KITTI frames.

    python benchmarks/loader.py [--height 192 --width 640] [--workers 2] [--samples 280]

Both produce the same training batch (target, t-1, t+1 as float tensors in [0, 1], sparse LiDAR
depth, K) at the same resolution with the same number of DataLoader workers:
- shard stream: ``TrainStream`` over shards made once by make-shards (JPEG + 16-bit PNG decode);
- folder loader: per sample, read three KITTI PNGs, resize, load the Velodyne scan and project it
  (what monodepth2-style ``KITTIRAWDataset`` + ``generate_depth_map`` do).
Frames 1..28 of the real drive (the ones with a scan and both neighbours) are cycled until
``--samples`` samples are read; shard writing is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from distill_depth.cli import main as cli_main
from distill_depth.data import TrainStream, kitti

DATE, DRIVE = "2011_09_26", "2011_09_26/2011_09_26_drive_unknown_sync"
FRAMES = range(1, 29)


def sample_root() -> Path:
    env = os.environ.get("DISTILL_DEPTH_SAMPLE_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "udacity_sfnd"


class FolderDataset(Dataset):
    """The common practice: PNGs + LiDAR projection per sample."""

    def __init__(self, root: Path, out_hw: tuple[int, int], length: int) -> None:
        self.root, self.out_hw, self.length = root, out_hw, length
        self.calib = kitti.load_calibration(root / DATE)

    def __len__(self) -> int:
        return self.length

    def _image(self, frame: int) -> torch.Tensor:
        image = kitti.read_image(kitti.image_path(self.root, DRIVE, 2, frame))
        image = image.resize((self.out_hw[1], self.out_hw[0]), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)

    def __getitem__(self, index: int) -> dict:
        frame = FRAMES[index % len(FRAMES)]
        native = kitti.read_image(kitti.image_path(self.root, DRIVE, 2, frame)).size[::-1]
        scan = kitti.load_velodyne(kitti.velodyne_path(self.root, DRIVE, frame))
        depth = kitti.project_velodyne(scan, self.calib, 2, native, self.out_hw)
        K = kitti.intrinsics(self.calib, 2, native, self.out_hw)
        return {
            "image": self._image(frame), "prev": self._image(frame - 1), "next": self._image(frame + 1),
            "sparse_depth": torch.from_numpy(depth)[None], "K": torch.from_numpy(K).float(),
        }


def time_it(batches, samples: int) -> float:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += batch["image"].shape[0] if isinstance(batch, dict) else batch.size
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=280)
    args = parser.parse_args()
    root = sample_root()
    if not (root / DRIVE).is_dir():
        print(f"real KITTI drive not found under {root} (set DISTILL_DEPTH_SAMPLE_DATA)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out_hw = (args.height, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "frames.txt"
        split.write_text("".join(f"{DRIVE} {f} l\n" for f in FRAMES))
        shards = Path(tmp) / "shards"
        code = cli_main(["make-shards", "--kitti-root", str(root), "--out", str(shards), "--split", str(split),
                         "--height", str(args.height), "--width", str(args.width), "--samples-per-shard", "7",
                         "--workers", str(args.workers), "--no-progress"])
        if code:
            return code
        stream = TrainStream(str(shards), args.batch_size, 0, 1, num_workers=args.workers,
                             samples_per_epoch=args.samples)
        shard_rate = time_it(stream.epoch(0), args.samples)
        folder = DataLoader(FolderDataset(root, out_hw, args.samples), batch_size=args.batch_size,
                            num_workers=args.workers, shuffle=True)
        folder_rate = time_it(folder, args.samples)
    print(f"{args.samples} samples at {args.width}x{args.height}, batch {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} CPUs")
    print(f"shard stream (JPEG + 16-bit PNG decode):        {shard_rate:8.1f} samples/s")
    print(f"folder loader (KITTI PNGs + LiDAR projection):  {folder_rate:8.1f} samples/s")
    print(f"ratio: {shard_rate / folder_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
