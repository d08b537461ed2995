"""Cityscapes end to end on a synthetic official-layout tree: disparity → depth, crop, K, errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill_depth.cli import main
from distill_depth.data import cityscapes as cs
from distill_depth.data import synth_cityscapes as synth
from tests.conftest import sample_data_root

HEIGHT, WIDTH = 64, 128  # kept rows 48; the bonnet starts at row 52


@pytest.fixture(scope="module")
def tree(module_tmp_path) -> Path:
    """2 snippets of 4 frames (17..20, 19 annotated): targets 18 (unlabelled) and 19 per snippet."""
    root = module_tmp_path / "cityscapes" / "cs"
    assert main(["synth", "--layout", "cityscapes", "--out", str(root), "--frames", "4", "--height", str(HEIGHT),
                 "--width", str(WIDTH), "--split", "val"]) == 0
    return root


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, entry = member.name.partition(".")
                samples.setdefault(key, {})[entry] = tar.extractfile(member).read()
    return samples


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _shards(root: Path, out: Path, *extra: str) -> int:
    return main(["make-shards", "--dataset", "cityscapes", "--root", str(root), "--out", str(out), "--workers", "1",
                 "--no-progress", *extra])


def test_synth_tree_is_the_official_layout_and_disparity_gives_the_exact_depth(tree):
    frame = cs.Frame("val", "synth0", 0, 19)
    for path in (cs.left_path(tree, frame), cs.right_path(tree, frame), cs.camera_path(tree, frame),
                 cs.disparity_path(tree, frame), cs.left_path(tree, frame.offset(-2))):
        assert path.is_file(), path
    assert not cs.disparity_path(tree, frame.offset(-1)).exists()  # only the annotated frame has one
    camera = cs.read_camera(cs.camera_path(tree, frame))
    assert camera.baseline == pytest.approx(0.209313) and camera.fx == pytest.approx(2262.52 * WIDTH / 2048)
    raw = _png(cs.disparity_path(tree, frame).read_bytes())
    assert raw.dtype == np.uint16
    disparity = cs.read_disparity(cs.disparity_path(tree, frame))
    exact = np.load(synth.exact_depth_path(tree, frame))
    valid = disparity > 0
    assert 0.5 < valid[:48].mean() < 0.97 and not valid[:48, 0].any()  # SGM-like holes, none at u = 0
    assert np.array_equal(disparity[valid], (raw[valid] - 1.0) / 256.0)
    depth = cs.depth_from_disparity(disparity, camera)
    # quantisation: the disparity is exact to ±0.5/256 px
    assert np.all(np.abs(camera.baseline * camera.fx / depth[valid] - camera.baseline * camera.fx / exact[valid])
                  <= 0.5 / 256 + 1e-6)
    assert np.allclose(depth[52:][valid[52:]], synth.BONNET_DEPTH, rtol=0.01)  # the ego-car band


def test_shards_crop_the_ego_car_and_keep_depth_and_k_exact(tree, tmp_path):
    out = tmp_path / "native"
    assert _shards(tree, out, "--split", "val", "--height", "48", "--width", "128", "--stereo") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["skipped"] == {"no_neighbours": 4, "no_disparity": 2}
    sample = _samples(out)["synth0_000000_000019"]
    meta = json.loads(sample["json"])
    frame = cs.Frame("val", "synth0", 0, 19)
    camera = cs.read_camera(cs.camera_path(tree, frame))
    assert np.allclose(meta["K"], camera.K()) and meta["cropped_hw"] == [48, 128]  # crop from below: K unchanged
    assert meta["stereo_T"][0][3] == pytest.approx(-camera.baseline) and "stereo.jpg" in sample
    rgb = _png(sample["rgb.jpg"]).astype(float)
    crop = np.asarray(Image.open(cs.left_path(tree, frame)).convert("RGB"))[:48].astype(float)
    assert rgb.shape == (48, 128, 3) and np.abs(rgb - crop).mean() < 3.0
    gt = _png(sample["gt.png"]).astype(np.float64) / 256.0
    exact = np.load(synth.exact_depth_path(tree, frame))[:48]
    valid = gt > 0
    bfx = camera.baseline * camera.fx
    bound = exact ** 2 / bfx * (0.5 / 256) * 1.01 + 0.5 / 256 + 1e-6  # disparity and PNG quantisation
    assert valid.mean() > 0.5 and np.all(np.abs(gt - exact)[valid] <= bound[valid])
    assert gt[valid].min() > 2 * synth.BONNET_DEPTH  # no bonnet left
    assert np.array_equal(_png(sample["depth.png"]), _png(sample["gt.png"]))


def test_resized_shards_scale_k_and_keep_unlabelled_frames(tree, tmp_path):
    out = tmp_path / "small"
    assert _shards(tree, out, "--split", "val", "--height", "24", "--width", "32", "--keep-unlabelled",
                   "--gt-full-res") == 0
    samples = _samples(out)
    assert sorted(samples) == ["synth0_000000_000018", "synth0_000000_000019",
                               "synth0_000001_000018", "synth0_000001_000019"]
    unlabelled = samples["synth0_000000_000018"]
    assert json.loads(unlabelled["json"])["labelled"] is False and "depth.png" not in unlabelled
    labelled = samples["synth0_000000_000019"]
    camera = cs.read_camera(cs.camera_path(tree, cs.Frame("val", "synth0", 0, 19)))
    sx, sy = 32 / 128, 24 / 48
    K = np.array(json.loads(labelled["json"])["K"])
    assert K[0, 0] == pytest.approx(camera.fx * sx) and K[1, 1] == pytest.approx(camera.fy * sy)
    assert K[0, 2] == pytest.approx((camera.u0 + 0.5) * sx - 0.5) and K[1, 2] == pytest.approx((camera.v0 + 0.5) * sy - 0.5)
    assert _png(labelled["rgb.jpg"]).shape == (24, 32, 3) and _png(labelled["depth.png"]).shape == (24, 32)
    assert _png(labelled["gt.png"]).shape == (48, 128)  # --gt-full-res: the cropped native size


def test_split_file_and_frame_offset(tree, tmp_path):
    split = tmp_path / "list.txt"
    split.write_text("synth0 synth0_000001_000019\n")
    assert _shards(tree, tmp_path / "k2", "--split", str(split), "--frame-offset", "2", "--keep-edge-frames") == 0
    sample = _samples(tmp_path / "k2")["synth0_000001_000019"]
    meta = json.loads(sample["json"])
    assert meta["frame_offset"] == 2 and meta["missing_neighbours"] == ["next"]  # 21 does not exist, 17 does
    assert meta["split"] == "val" and sample["next.jpg"] == sample["rgb.jpg"]


def _broken(tree: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(tree, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    ("camera", "synth0_000000_000019_camera.json: camera JSON not found"),
    ("lone", "has no temporal neighbour"),
    ("corrupt", "synth0_000000_000019_leftImg8bit.png: corrupt image"),
    ("split", "list.txt:2: frame synth0_000009_000019 not found"),
    ("flat", "flattened layout"),
])
def test_bad_input_is_one_clear_error(tree, tmp_path, capsys, damage, message):
    root = _broken(tree, tmp_path)
    frame = cs.Frame("val", "synth0", 0, 19)
    split = "val"
    if damage == "camera":
        cs.camera_path(root, frame).unlink()
    elif damage == "lone":
        for delta in (-2, -1, 1):
            cs.left_path(root, frame.offset(delta)).unlink()
    elif damage == "corrupt":
        cs.left_path(root, frame).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif damage == "split":
        split = str(tmp_path / "list.txt")
        Path(split).write_text("synth0 synth0_000000_000019\nsynth0 synth0_000009_000019\n")
    elif damage == "flat":
        cs.camera_path(root, frame).write_text(json.dumps({"baseline": 0.2, "fx": 1.0, "fy": 1.0, "u0": 0, "v0": 0}))
    capsys.readouterr()
    assert _shards(root, tmp_path / "out", "--split", split) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# the one real Cityscapes frame (flattened, non-official layout) in ../shared/data


@pytest.fixture(scope="module")
def real_frame() -> Path:
    folder = sample_data_root() / "cvml_project_cityscapes"
    if not (folder / "camera.json").is_file():
        pytest.skip(f"real Cityscapes frame not found at {folder} (set DISTILL_DEPTH_SAMPLE_DATA)")
    return folder


def test_real_flattened_camera_file_is_a_clear_error(real_frame):
    with pytest.raises(cs.CityscapesDataError, match="lacks extrinsic.baseline.*flattened layout"):
        cs.read_camera(real_frame / "camera.json")


def test_real_frame_goes_through_crop_and_resize(real_frame, tmp_path):
    """The real 2048×1024 frame placed as t−1, t, t+1 of an official tree, its camera re-nested."""
    image = real_frame / "stuttgart_01_000000_003715_leftImg8bit.png"
    flat = json.loads((real_frame / "camera.json").read_text())
    root = tmp_path / "real"
    target = cs.parse_frame_name("stuttgart_01_000000_003715", "test", "test")
    for delta in (-1, 0, 1):
        path = cs.left_path(root, target.offset(delta))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(image)
    cs.camera_path(root, target).parent.mkdir(parents=True)
    cs.camera_path(root, target).write_text(json.dumps({
        "intrinsic": {k: flat[k] for k in ("fx", "fy", "u0", "v0")}, "extrinsic": {"baseline": flat["baseline"]}}))
    assert _shards(root, tmp_path / "out", "--split", "test", "--keep-unlabelled") == 0  # default 512x192
    sample = _samples(tmp_path / "out")["stuttgart_01_000000_003715"]
    rgb = _png(sample["rgb.jpg"]).astype(float)
    with Image.open(image) as full:
        assert full.size == (2048, 1024)
        expected = np.asarray(full.convert("RGB").crop((0, 0, 2048, 768)).resize((512, 192), Image.Resampling.LANCZOS))
    assert rgb.shape == (192, 512, 3) and np.abs(rgb - expected).mean() < 2.0
    K = np.array(json.loads(sample["json"])["K"])
    assert K[0, 0] == pytest.approx(flat["fx"] / 4) and K[1, 1] == pytest.approx(flat["fy"] / 4)
    assert K[0, 2] == pytest.approx((flat["u0"] + 0.5) / 4 - 0.5) and K[1, 2] == pytest.approx((flat["v0"] + 0.5) / 4 - 0.5)
