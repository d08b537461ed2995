"""Writing WebDataset shards of any source: tar entries, atomic shards, the manifest.

The dataset-specific half (which frames, how one sample is encoded) lives in ``shards`` (KITTI
raw) and ``cityscapes_shards``; both hand this module jobs with ``.key``, ``.encode(options)``,
``.missing`` and ``.labelled``. Every shard is written as ``.tar.tmp`` + fsync + rename with fixed
tar metadata (reproducible bytes), and ``manifest.json`` last, so a folder with a manifest is
always complete.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distill_depth.data import kitti
from distill_depth.data.shard_reader import sha256_file

FORMAT_NAME = "distill-depth-shards"
FORMAT_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass(frozen=True)
class ShardOptions:
    """How every sample of one ``make-shards`` call is written."""

    out_dir: str
    out_hw: tuple[int, int] | None  # None = native resolution
    stereo: bool
    jpeg_quality: int


def encode_jpeg(image: Image.Image, out_hw: tuple[int, int], quality: int) -> bytes:
    """JPEG bytes of ``image`` resized (Lanczos) to ``out_hw`` = (H, W)."""
    if image.size != (out_hw[1], out_hw[0]):
        image = image.resize((out_hw[1], out_hw[0]), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: colour edges matter to photometric losses
    return buffer.getvalue()


def encode_png16(depth: np.ndarray) -> bytes:
    """KITTI's depth PNG: uint16 metres×256, 0 = no depth."""
    buffer = io.BytesIO()
    Image.fromarray(kitti.encode_depth(depth)).save(buffer, format="PNG")
    return buffer.getvalue()


def resample_depth(depth: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Move every valid pixel to the output pixel whose centre is nearest; nearest depth wins.

    Pixel centres map as (i + 0.5)·s - 0.5, the same as the intrinsics; nothing is interpolated.
    """
    if depth.shape == tuple(out_hw):
        return depth
    (h0, w0), (h1, w1) = depth.shape, out_hw
    rows, cols = np.nonzero(depth > 0)
    v = np.round((rows + 0.5) * (h1 / h0) - 0.5).astype(np.int64).clip(0, h1 - 1)
    u = np.round((cols + 0.5) * (w1 / w0) - 0.5).astype(np.int64).clip(0, w1 - 1)
    out = np.full(h1 * w1, np.inf)
    np.minimum.at(out, v * w1 + u, depth[rows, cols].astype(np.float64))
    out[~np.isfinite(out)] = 0.0
    return out.reshape(h1, w1).astype(np.float32)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: tuple[int, list, ShardOptions]) -> dict:
    """Write one shard atomically (``.tar.tmp``, fsync, rename); return its manifest record."""
    index, jobs, options = task
    final = Path(options.out_dir) / SHARD_PATTERN.format(index)
    temporary = final.with_name(final.name + ".tmp")
    with open(temporary, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for job in jobs:  # shards.FrameJob, cityscapes_shards.CityscapesJob: anything with .key and .encode
                sample = job.encode(options)
                for suffix in sorted(sample):
                    _add(tar, f"{job.key}.{suffix}", sample[suffix])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return {"name": final.name, "num_samples": len(jobs), "bytes": final.stat().st_size, "sha256": sha256_file(final)}


def write_json_atomic(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def manifest_for(jobs: list, records: list[dict], options: ShardOptions, *, entries: list[str], split_info: dict,
                 skipped: Counter, skip_reasons: dict[str, str], resolution, source: dict, extra: dict | None = None) -> dict:
    """``manifest.json`` of written jobs (any dataset; ``extra`` keys go right after the format)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **(extra or {}),
        "num_samples": len(jobs),
        "resolution": resolution,
        "stereo": options.stereo,
        "jpeg_quality": options.jpeg_quality,
        "entries": entries,
        "split": split_info,
        "source": source,
        "skipped": {reason: skipped.get(reason, 0) for reason in skip_reasons},
        "kept_without_neighbours": sum(1 for job in jobs if job.missing),
        "unlabelled": sum(1 for job in jobs if not job.labelled),
        "shards": records,
    }


def print_summary(manifest: dict, out: str, skip_reasons: dict[str, str], unlabelled_because: str) -> None:
    skipped = manifest["skipped"]
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {out}"
          + (f" ({manifest['kept_without_neighbours']} without a temporal neighbour, kept)"
             if manifest["kept_without_neighbours"] else "")
          + (f" ({manifest['unlabelled']} unlabelled: {unlabelled_because})" if manifest["unlabelled"] else ""))
    print(f"skipped {sum(skipped.values())} frames: "
          + ", ".join(f"{n} {reason} ({skip_reasons[reason]})" for reason, n in skipped.items()))


def write_jobs(out_dir: Path, jobs: list, options: ShardOptions, *, samples_per_shard: int, workers: int,
               progress: bool) -> list[dict]:
    """Write ``jobs`` (each with ``.key`` and ``.encode(options)``) into shards; their records, sorted."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(i, jobs[start:start + samples_per_shard], options)
             for i, start in enumerate(range(0, len(jobs), samples_per_shard))]
    records: list[dict] = []
    bar = tqdm(total=len(jobs), unit="sample", desc="make-shards", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1:
            for task in tasks:
                records.append(write_shard(task))
                bar.update(records[-1]["num_samples"])
        else:
            # spawn, not fork: the parent may hold threads (torch, tqdm) whose locks a fork copies;
            # the executor also reports a dead worker instead of waiting for it forever
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
                futures = [pool.submit(write_shard, task) for task in tasks]
                try:
                    for future in as_completed(futures):
                        records.append(future.result())
                        bar.update(records[-1]["num_samples"])
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    except BaseException:
        for task in tasks:  # our own unfinished temporaries only; finished shards stay
            Path(out_dir / (SHARD_PATTERN.format(task[0]) + ".tmp")).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    records.sort(key=lambda r: r["name"])
    return records
