"""`distill-depth predict` on real KITTI frames, an odd-sized image and a corrupt one, with a real
briefly trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill_depth.cli import main
from distill_depth.predict import ImageReadError, collect_images, read_image
from tests.trained_checkpoint import trained_run

KITTI_FRAME = "udacity_sfnd/2011_09_26/2011_09_26_drive_unknown_sync/image_02/data/0000000000.png"
ODD_SIZED = "monodepth2/assets/test_image.jpg"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_shards) -> Path:
    return trained_run(tmp_path_factory, bundled_shards)


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    (tmp_path / "notes.txt").write_text("skip me")
    images, failures = collect_images([str(tmp_path), str(tmp_path / "missing.jpg")])
    assert images == [bad] and failures == [(str(tmp_path / "missing.jpg"), "no such file or folder")]


def test_predict_real_frames_odd_sizes_and_a_corrupt_image(run_dir, sample_data, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    kitti = Image.open(sample_data / KITTI_FRAME)
    kitti.crop((100, 50, 433, 151)).save(folder / "odd_333x101.png")  # odd size, derived in the test only
    (folder / "corrupt.jpg").write_bytes((sample_data / ODD_SIZED).read_bytes()[:700])  # truncated JPEG
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(run_dir), str(sample_data / KITTI_FRAME), str(sample_data / ODD_SIZED),
               str(folder), "--out", str(out), "--branch", "fused",
               "--format", "npy", "--format", "png16", "--format", "color"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "corrupt.jpg" in captured.err and "1 input(s) failed" in captured.err
    expected = {"0000000000": (375, 1242), "test_image": Image.open(sample_data / ODD_SIZED).size[::-1],
                "odd_333x101": (101, 333)}
    for stem, (height, width) in expected.items():
        depth = np.load(out / f"{stem}_fused.npy")
        confidence = np.load(out / f"{stem}_fused_confidence.npy")
        assert depth.shape == confidence.shape == (height, width) and depth.dtype == np.float32
        assert np.isfinite(depth).all() and (depth > 0).all() and ((confidence >= 0) & (confidence <= 1)).all()
        png = np.asarray(Image.open(out / f"{stem}_fused.png"))
        assert png.dtype == np.uint16 and png.shape == (height, width)
        np.testing.assert_array_equal(png, np.clip(np.rint(depth * 256.0), 0, 65535).astype(np.uint16))
        color = np.asarray(Image.open(out / f"{stem}_fused_color.png"))
        assert color.shape == (height, 3 * width + 4, 3)  # image | depth | confidence, 2-pixel gaps
    assert not list(out.glob("corrupt*"))


def test_predict_single_branch_all_good(run_dir, sample_data, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(run_dir), str(sample_data / KITTI_FRAME),
                 "--out", str(out), "--branch", "U"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000000000_U.npy", "0000000000_U_confidence.npy"]
