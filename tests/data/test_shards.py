"""make-shards end to end: the real drive at native and reduced size, a stereo tree, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill_depth.cli import main
from distill_depth.data import kitti

DRIVE = "2011_09_26/2011_09_26_drive_unknown_sync"


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, entry = member.name.partition(".")
            samples.setdefault(key, {})[entry] = tar.extractfile(member).read()
    return samples


def png16(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 256


def all_samples(out: Path) -> dict[str, dict[str, bytes]]:
    merged = {}
    for shard in sorted(out.glob("*.tar")):
        merged.update(read_tar(shard))
    return merged


@pytest.mark.parametrize("size", [None, (96, 320)], ids=["native", "320x96"])
def test_real_drive_end_to_end(kitti_raw_root: Path, tmp_path: Path, size, capsys) -> None:
    out = tmp_path / "shards"
    args = ["make-shards", "--kitti-root", str(kitti_raw_root), "--out", str(out), "--drives", "2011_09_26/*",
            "--samples-per-shard", "8", "--workers", "2", "--no-progress"]
    if size:
        args += ["--height", str(size[0]), "--width", str(size[1])]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # 78 images, scans for 0..29: targets 1..29 (29 needs only the image of 30), 0 and 77 lack a neighbour
    assert "wrote 29 samples in 4 shards" in printed and "2 no_neighbours" in printed and "47 no_lidar" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 29 and manifest["format_version"] == 1
    assert manifest["skipped"] == {"no_neighbours": 2, "no_lidar": 47}
    assert manifest["resolution"] == (list(size) if size else "native")
    assert [s["num_samples"] for s in manifest["shards"]] == [8, 8, 8, 5]
    for record in manifest["shards"]:
        assert hashlib.sha256((out / record["name"]).read_bytes()).hexdigest() == record["sha256"]
    assert not list(out.glob("*.tmp"))
    samples = all_samples(out)
    key = "2011_09_26_drive_unknown_sync_l_0000000015"
    assert len(samples) == 29 and key in samples
    sample = samples[key]
    assert set(sample) == {"rgb.jpg", "prev.jpg", "next.jpg", "depth.png", "json"}
    meta = json.loads(sample["json"])
    hw = size or (375, 1242)
    assert meta["orig_hw"] == [375, 1242] and meta["frame"] == 15 and meta["side"] == "l"
    assert meta["drive"] == "2011_09_26_drive_unknown_sync" and meta["baseline_m"] == pytest.approx(0.5327, abs=2e-4)
    calib = kitti.load_calibration(kitti_raw_root / "2011_09_26")
    np.testing.assert_allclose(meta["K"], kitti.intrinsics(calib, 2, (375, 1242), hw))
    assert Image.open(io.BytesIO(sample["rgb.jpg"])).size == (hw[1], hw[0])
    scan = kitti.load_velodyne(kitti.velodyne_path(kitti_raw_root, DRIVE, 15))
    expected = kitti.project_velodyne(scan, calib, 2, (375, 1242), hw)
    stored = png16(sample["depth.png"])
    assert stored.shape == hw and ((stored > 0) == (expected > 0)).all()
    np.testing.assert_allclose(stored, expected, atol=0.5 / 256 + 1e-6)
    if size is None:  # the native target image is the camera's PNG, through JPEG q95
        original = np.asarray(Image.open(kitti.image_path(kitti_raw_root, DRIVE, 2, 15)).convert("RGB"), np.float32)
        decoded = np.asarray(Image.open(io.BytesIO(sample["rgb.jpg"])), np.float32)
        assert np.abs(original - decoded).mean() < 2


def test_real_drive_stereo_and_right_side_give_clear_errors(kitti_raw_root: Path, tmp_path: Path, capsys) -> None:
    base = ["make-shards", "--kitti-root", str(kitti_raw_root), "--no-progress", "--workers", "1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--stereo"]) == 2
    assert "image_03" in capsys.readouterr().err
    split = tmp_path / "right.txt"
    split.write_text(f"{DRIVE} 5 r\n")
    assert main(base + ["--out", str(tmp_path / "b"), "--split", str(split)]) == 2
    err = capsys.readouterr().err
    assert "right.txt:1" in err and "image_03" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_split_file_errors_and_success(kitti_raw_root: Path, tmp_path: Path, capsys) -> None:
    split = tmp_path / "split.txt"
    base = ["make-shards", "--kitti-root", str(kitti_raw_root), "--no-progress", "--split", str(split)]
    split.write_text(f"{DRIVE} 3 l\n2011_09_26/2011_09_26_drive_0022_sync 473 l\n")
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "split.txt:2" in capsys.readouterr().err  # names the line of the missing drive
    split.write_text(f"{DRIVE} 3 l\n{DRIVE} 90 l\n")
    assert main(base + ["--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "split.txt:2" in err and "0000000090.png" in err
    split.write_text(f"{DRIVE} 3 l\n{DRIVE} 0 l\n{DRIVE} 40 l\n{DRIVE} 4 l\n")
    assert main(base + ["--out", str(tmp_path / "c"), "--height", "48", "--width", "160"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["skipped"] == {"no_neighbours": 1, "no_lidar": 1}
    assert manifest["split"]["name"] == "split.txt" and manifest["split"]["lines"] == 4
    assert list(all_samples(tmp_path / "c")) == [  # split order kept
        "2011_09_26_drive_unknown_sync_l_0000000003", "2011_09_26_drive_unknown_sync_l_0000000004"]


def test_stereo_tree(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--stereo", "--sides", "lr",
                 "--no-progress", "--workers", "1"]) == 0
    samples = all_samples(out)
    assert len(samples) == 8  # frames 1..4, both sides
    left = samples["2011_01_01_drive_0001_sync_l_0000000002"]
    right = samples["2011_01_01_drive_0001_sync_r_0000000002"]
    assert set(left) == {"rgb.jpg", "prev.jpg", "next.jpg", "stereo.jpg", "depth.png", "gt.png", "json"}
    assert left["stereo.jpg"] == right["rgb.jpg"] and right["stereo.jpg"] == left["rgb.jpg"]
    T_left, T_right = (np.array(json.loads(s["json"])["stereo_T"]) for s in (left, right))
    np.testing.assert_allclose(T_left[:3, 3], [-0.5, 0, 0], atol=1e-9)
    np.testing.assert_allclose(T_right, np.linalg.inv(T_left), atol=1e-9)
    assert json.loads(left["json"])["baseline_m"] == pytest.approx(0.5)
    gt_file = tiny_tree / "2011_01_01/2011_01_01_drive_0001_sync/proj_depth/groundtruth/image_03/0000000002.png"
    np.testing.assert_array_equal(png16(right["gt.png"]), kitti.read_depth_png(gt_file))
    # the right camera: same intrinsics (0-based centres), its own P_rect_03 projection
    np.testing.assert_allclose(json.loads(right["json"])["K"], [[40, 0, 23.5], [0, 40, 7.5], [0, 0, 1]])
    calib = kitti.load_calibration(tiny_tree / "2011_01_01")
    scan = kitti.load_velodyne(kitti.velodyne_path(tiny_tree, "2011_01_01/2011_01_01_drive_0001_sync", 2))
    np.testing.assert_allclose(png16(right["depth.png"]), kitti.project_velodyne(scan, calib, 3, (16, 48)),
                               atol=0.5 / 256 + 1e-6)


def test_reduced_ground_truth_is_not_interpolated(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--height", "8", "--width", "24",
                 "--no-progress", "--workers", "1"]) == 0
    sample = all_samples(out)["2011_01_01_drive_0001_sync_l_0000000001"]
    gt = kitti.read_depth_png(tiny_tree / "2011_01_01/2011_01_01_drive_0001_sync/proj_depth/groundtruth/"
                              "image_02/0000000001.png")
    small = png16(sample["gt.png"])
    assert small.shape == (8, 24)
    # each output pixel takes the nearest of the 2×2 input pixels whose centres map onto it
    np.testing.assert_allclose(small, gt.reshape(8, 2, 24, 2).min(axis=(1, 3)), atol=1e-6)


@pytest.mark.parametrize("damage", ["corrupt_png", "truncated_bin", "missing_calib"])
def test_bad_tree_input_names_the_file(tiny_tree: Path, tmp_path: Path, damage: str, capsys) -> None:
    drive = tiny_tree / "2011_01_01/2011_01_01_drive_0001_sync"
    if damage == "corrupt_png":
        bad = drive / "image_02/data/0000000003.png"
        bad.write_bytes(bad.read_bytes()[:50])
    elif damage == "truncated_bin":
        bad = drive / "velodyne_points/data/0000000003.bin"
        bad.write_bytes(bad.read_bytes()[:-5])
    else:
        bad = tiny_tree / "2011_01_01/calib_velo_to_cam.txt"
        bad.unlink()
    out = tmp_path / "s"
    workers = "2" if damage == "corrupt_png" else "1"  # the error also crosses the process pool
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--samples-per-shard", "1",
                 "--no-progress", "--workers", workers]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))


def test_existing_output_is_never_overwritten(tiny_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    args = ["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--no-progress", "--workers", "1"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shards_are_reproducible(tiny_tree: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(tmp_path / name),
                     "--no-progress", "--workers", "1"]) == 0
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_keep_edge_frames_for_evaluation_splits(tiny_tree: Path, tmp_path: Path, capsys) -> None:
    split = tmp_path / "test_files.txt"  # Eigen test holds frame 0 of many drives
    split.write_text("2011_01_01/2011_01_01_drive_0001_sync 0000000000 l\n"
                     "2011_01_01/2011_01_01_drive_0001_sync 0000000005 l\n")
    out = tmp_path / "s"
    assert main(["make-shards", "--kitti-root", str(tiny_tree), "--out", str(out), "--split", str(split),
                 "--keep-edge-frames", "--no-progress", "--workers", "1"]) == 0
    assert "2 without a temporal neighbour, kept" in capsys.readouterr().out
    samples = all_samples(out)
    first, last = (samples[f"2011_01_01_drive_0001_sync_l_{f:010d}"] for f in (0, 5))
    assert json.loads(first["json"])["missing_neighbours"] == ["prev"] and first["prev.jpg"] == first["rgb.jpg"]
    assert json.loads(last["json"])["missing_neighbours"] == ["next"] and last["next.jpg"] == last["rgb.jpg"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kept_without_neighbours"] == 2 and manifest["skipped"]["no_neighbours"] == 0
