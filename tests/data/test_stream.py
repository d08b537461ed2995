"""Streams over real tars: round trip, rank × worker splitting, evaluation coverage, bad shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_depth.data import ShardError, TrainStream, eval_batches, resolve_shards
from distill_depth.data import kitti
from distill_depth.types import Batch

ALL_KEYS = {f"2011_01_01_drive_000{d}_sync_l_{f:010d}" for d in (1, 2) for f in range(1, 17)}


def keys_of(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


def test_round_trip_writer_to_reader(stream_shards: Path) -> None:
    batches = list(eval_batches(str(stream_shards), 5, 0, 1))
    assert [b.size for b in batches] == [5] * 6 + [2]
    batch = batches[0]
    assert batch.image.shape == (5, 3, 16, 48) and batch.image.dtype == torch.float32
    assert 0 <= batch.image.min() and batch.image.max() <= 1
    assert set(batch.sources) == {"prev", "next", "stereo"} and batch.sources["prev"].shape == (5, 3, 16, 48)
    assert batch.sparse_depth.shape == (5, 1, 16, 48) and batch.gt_depth.shape == (5, 1, 16, 48)
    assert batch.K.shape == (5, 3, 3) and batch.stereo_T.shape == (5, 4, 4)
    # values: the decoded sample is what make-shards wrote, from the raw tree
    root = stream_shards.parent / "raw"
    drive, frame = "2011_01_01/2011_01_01_drive_0001_sync", 1
    assert batch.keys[0] == "2011_01_01_drive_0001_sync_l_0000000001"
    calib = kitti.load_calibration(root / "2011_01_01")
    scan = kitti.load_velodyne(kitti.velodyne_path(root, drive, frame))
    expected_depth = kitti.project_velodyne(scan, calib, 2, (16, 48))
    np.testing.assert_allclose(batch.sparse_depth[0, 0].numpy(), expected_depth, atol=0.5 / 256 + 1e-6)
    gt = kitti.read_depth_png(kitti.groundtruth_path(root, drive, 2, frame))
    np.testing.assert_array_equal(batch.gt_depth[0, 0].numpy(), gt)  # 16 bits survive, > 1 m values too
    assert batch.gt_depth.max() > 70
    np.testing.assert_allclose(batch.K[0].numpy(), kitti.intrinsics(calib, 2, (16, 48), (16, 48)), atol=1e-5)
    original = np.asarray(Image.open(kitti.image_path(root, drive, 2, frame)), np.float32) / 255
    decoded = batch.image[0].permute(1, 2, 0).numpy()
    assert np.abs(original - decoded).mean() < 0.03  # JPEG q95 of pure noise
    prev = np.asarray(Image.open(kitti.image_path(root, drive, 2, frame - 1)), np.float32) / 255
    assert np.abs(prev - batch.sources["prev"][0].permute(1, 2, 0).numpy()).mean() < 0.03


def test_two_ranks_two_workers_cover_every_sample(stream_shards: Path) -> None:
    per_rank = []
    for rank in (0, 1):
        stream = TrainStream(str(stream_shards), 2, rank, 2, num_workers=2, seed=7)
        assert stream.batches_per_epoch == 8  # 32 samples / (2 per batch × 2 ranks)
        batches = list(stream.epoch(0))
        assert len(batches) == 8 and all(b.size == 2 for b in batches)
        assert set(batches[0].sources) == {"prev", "next"} and batches[0].stereo_T is None
        per_rank.append(keys_of(batches))
    assert Counter(per_rank[0] + per_rank[1]) == Counter(ALL_KEYS)  # every sample exactly once


def test_unbalanced_counts_still_give_equal_batches(stream_shards: Path) -> None:
    counts = set()
    for rank in range(3):
        stream = TrainStream(str(stream_shards), 3, rank, 3, num_workers=2, seed=1, use_stereo=True)
        batches = list(stream.epoch(1))
        counts.add(len(batches))
        assert len(batches) == stream.batches_per_epoch == 4  # ceil(ceil(32 / 9) / 2) · 2
        assert batches[0].stereo_T.shape == (3, 4, 4) and "stereo" in batches[0].sources
    assert counts == {4}


def test_same_seed_and_rank_read_identical_streams(stream_shards: Path) -> None:
    def run(seed: int, epoch: int, workers: int = 2) -> list[Batch]:
        return list(TrainStream(str(stream_shards), 4, 1, 2, num_workers=workers, seed=seed).epoch(epoch))

    a, b = run(3, 0), run(3, 0)
    assert keys_of(a) == keys_of(b)
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.sparse_depth, y.sparse_depth)
    assert keys_of(run(3, 1)) != keys_of(a)  # reshuffled per epoch
    assert keys_of(run(4, 0)) != keys_of(a)  # and per seed
    assert sorted(keys_of(run(3, 0, workers=0))) != []  # in-process reading works too


@pytest.mark.parametrize("start", [3, 4])
def test_resume_skips_exactly_start_batch(stream_shards: Path, start: int) -> None:
    stream = TrainStream(str(stream_shards), 2, 0, 2, num_workers=2, seed=5)
    full = [b.keys for b in stream.epoch(2)]
    assert [b.keys for b in stream.epoch(2, start_batch=start)] == full[start:]


def test_evaluation_covers_every_sample_once_in_order(stream_shards: Path) -> None:
    seen = []
    for rank in (0, 1):
        batches = list(eval_batches(str(stream_shards), 3, rank, 2, num_workers=2))
        assert all(b.size == 3 for b in batches[:-1]) and 1 <= batches[-1].size <= 3
        assert keys_of(batches) == keys_of(list(eval_batches(str(stream_shards), 3, rank, 2, num_workers=2)))
        seen += keys_of(batches)
    assert Counter(seen) == Counter(ALL_KEYS)
    assert seen == keys_of(list(eval_batches(str(stream_shards), 7, 0, 1)))  # manifest order


def test_brace_pattern_and_single_tar(stream_shards: Path) -> None:
    pattern = str(stream_shards / "shard-{000000..000003}.tar")
    shards = resolve_shards(pattern)
    assert len(shards.urls) == 4 and shards.num_samples == 16  # counts from the folder's manifest
    single = resolve_shards(str(stream_shards / "shard-000001.tar"))
    assert single.num_samples == 4
    assert len(list(TrainStream(pattern, 2, 0, 1, num_workers=0).epoch(0))) == 8


# ---- bad input -------------------------------------------------------------------------------


@pytest.fixture
def shard_copy(stream_shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stream_shards, tmp_path / "copy"))


def test_checksum_mismatch_names_the_shard(shard_copy: Path) -> None:
    shard = shard_copy / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.tar.*sha256"):
        TrainStream(str(shard_copy), 2, 0, 1)


def test_truncated_shard(shard_copy: Path) -> None:
    shard = shard_copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*truncated"):
        resolve_shards(str(shard_copy))  # size differs from the manifest
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*truncated"):
        TrainStream(str(shard), 2, 0, 1)  # no manifest check: the tar headers tell
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    (shard_copy / "manifest.json").unlink()  # a brace pattern without manifest: found while reading
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        list(eval_batches(str(shard_copy / "shard-{000000..000002}.tar"), 4, 0, 1))
    assert manifest["shards"][1]["name"] == "shard-000001.tar"


@pytest.mark.parametrize("kind", ["zero_bytes", "no_members"])
def test_empty_shard(tmp_path: Path, kind: str) -> None:
    shard = tmp_path / "empty.tar"
    if kind == "zero_bytes":
        shard.write_bytes(b"")
    else:
        with tarfile.open(shard, "w"):
            pass
    with pytest.raises(ShardError, match=r"empty\.tar.*(empty|no samples)"):
        TrainStream(str(shard), 2, 0, 1)


def test_missing_manifest_and_missing_shard(shard_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="manifest.json not found"):
        resolve_shards(str(tmp_path))
    (shard_copy / "shard-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000003\.tar.*missing"):
        resolve_shards(str(shard_copy))


def test_corrupt_depth_png_in_a_shard_names_the_sample(tmp_path: Path, stream_shards: Path) -> None:
    source = stream_shards / "shard-000000.tar"
    bad = tmp_path / "bad.tar"
    with tarfile.open(source) as src, tarfile.open(bad, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith("0000000002.depth.png"):
                data = data[:40]
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"bad\.tar.*0000000002.*depth\.png"):
        list(eval_batches(str(bad), 4, 0, 1))


def test_stereo_requested_from_mono_shards(tiny_tree: Path, tmp_path: Path) -> None:
    from distill_depth.cli import main

    out = tmp_path / "mono"
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0
    with pytest.raises(ShardError, match="stereo"):
        TrainStream(str(out), 2, 0, 1, num_workers=0, use_stereo=True)  # the manifest tells
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*stereo"):  # a bare tar: found while reading
        list(TrainStream(str(out / "shard-000000.tar"), 2, 0, 1, num_workers=0, use_stereo=True).epoch(0))


def test_more_slots_than_samples_still_equal_batches(tiny_tree: Path, tmp_path: Path) -> None:
    from distill_depth.cli import main

    out = tmp_path / "few"
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0  # 4 samples, 6 ranks
    batches = [list(TrainStream(str(out), 1, r, 6, num_workers=0).epoch(0)) for r in range(6)]
    assert [len(b) for b in batches] == [1] * 6
    assert len({k for b in batches for k in keys_of(b)}) == 4  # every sample read, some twice


def test_bundled_shards_geometry_is_consistent(bundled_shards: Path) -> None:
    """K (0-based centres), stereo_T and gt.png agree: warping the stereo image with the true
    depth reproduces the target far better than the inverse transform or no motion does."""
    batch = next(iter(eval_batches(str(bundled_shards / "val"), 4, 0, 1)))
    assert batch.image.shape[-2:] == (96, 320) and batch.stereo_T is not None
    _, _, H, W = batch.image.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)]).reshape(3, -1)

    def error(T: torch.Tensor) -> float:
        errors = []
        for i in range(batch.size):
            depth = batch.gt_depth[i].reshape(1, -1)
            X = torch.linalg.inv(batch.K[i]) @ pixels * depth
            p = batch.K[i] @ (T[i, :3, :3] @ X + T[i, :3, 3:])
            grid = torch.stack([p[0] / p[2] / (W - 1) * 2 - 1, p[1] / p[2] / (H - 1) * 2 - 1], -1)
            grid = grid.reshape(1, H, W, 2)
            warped = torch.nn.functional.grid_sample(batch.sources["stereo"][i:i + 1], grid, align_corners=True)
            valid = (depth.reshape(H, W) > 0) & (grid[0].abs().amax(-1) < 1)
            errors.append((warped[0] - batch.image[i]).abs().mean(0)[valid].mean().item())
        return sum(errors) / len(errors)

    true = error(batch.stereo_T)
    assert true < 0.04
    assert true < 0.3 * error(torch.linalg.inv(batch.stereo_T))
    assert true < 0.3 * error(torch.eye(4).expand(batch.size, 4, 4))
    manifest = json.loads((bundled_shards / "train" / "manifest.json").read_text())
    train_drives = {k.split("_l_")[0] for k in keys_of(list(eval_batches(str(bundled_shards / "train"), 50, 0, 1)))}
    assert manifest["num_samples"] == 200 and manifest["resolution"] == [96, 320]
    assert not train_drives & {k.split("_l_")[0] for k in batch.keys}
