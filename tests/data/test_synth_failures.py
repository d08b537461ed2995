"""`distill-depth synth` failure modes: each flag changes what it should and nothing else; region labels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill_depth.data import kitti, regions
from distill_depth.data import synth_failures as failures
from distill_depth.data import synth_scene as sc
from distill_depth.data.synth import generate, read_poses
from distill_depth.data.synth_calib import Rig
from distill_depth.data.synth_failures import FailureModes
from distill_depth.data.synth_sensors import lidar_directions, lidar_regions

H, W, FRAMES, SEED, BEAMS, AZ = 64, 192, 3, 5, 22, 1000
# sha256 over (relative path, bytes) of every file of generate(drives=1, frames=3, seed=5, 32x96,
# azimuth_steps=400, beams=22), measured with the generator before the failure modes existed (commit ffc6794).
CLEAN_DIGEST = "8a8eea4919d7800a565da11d112d35e3ad3032b5964c6bb8befc4bc4ccbd2990"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_without_flags_the_output_is_byte_identical_to_before(tmp_path: Path) -> None:
    generate(tmp_path, drives=1, frames=3, seed=5, height=32, width=96, azimuth_steps=400, beams=22)
    assert _digest(tmp_path) == CLEAN_DIGEST


def _drive(root: Path, **modes: object) -> Path:
    (drive,) = generate(root, drives=1, frames=FRAMES, seed=SEED, height=H, width=W, azimuth_steps=AZ, beams=BEAMS,
                        modes=FailureModes(**modes))
    return drive


@pytest.fixture(scope="module")
def clean(module_tmp_path: Path) -> Path:
    return _drive(module_tmp_path / "clean", regions=True)


def _only_changed(drive: Path, clean: Path) -> set[str]:
    a, b = _files(drive), _files(clean)
    assert set(a) >= set(b)
    return {name.split("/")[0] + "/" + name.split("/")[1] if "/" in name else name
            for name in b if a[name] != b[name]}


def _labels(drive: Path, frame: int) -> np.ndarray:
    return np.asarray(Image.open(drive / "proj_depth/regions/image_02" / f"{frame:010d}.png"))


def _gt(drive: Path, frame: int) -> np.ndarray:
    return kitti.read_depth_png(kitti.groundtruth_path(drive.parent, drive.name, 2, frame)).astype(np.float64)


def test_regions_flag_adds_labels_and_changes_nothing_else(clean: Path, tmp_path: Path) -> None:
    plain = _drive(tmp_path)
    a, b = _files(clean), _files(plain)
    assert {k for k in a if "regions" not in k} == set(b) and all(a[k] == b[k] for k in b)
    assert sum("proj_depth/regions/image_0" in k for k in a) == 2 * FRAMES


def test_regions_match_the_lidar_geometry(clean: Path) -> None:
    calib = kitti.load_calibration(clean.parent)
    for frame in range(FRAMES):
        labels = _labels(clean, frame)
        points = kitti.load_velodyne(clean / "velodyne_points/data" / f"{frame:010d}.bin")
        sparse = kitti.project_velodyne(points, calib, 2, (H, W)) > 0
        on_row, above = regions.region_mask(labels, "on_lidar_row"), regions.region_mask(labels, "above_top_beam")
        assert sparse.sum() > 300 and np.mean(on_row[sparse]) > 0.9  # LiDAR lands on LiDAR rows ...
        assert 0.1 < on_row[_gt(clean, frame) > 0].mean() < 0.7  # ... which are not everywhere
        assert above.sum() > 50 and not np.any(sparse & above)  # nothing above the top beam
        assert not np.any(on_row & above)
        glass = regions.region_mask(labels, "no_return")
        assert glass.sum() > 20 and np.all(_gt(clean, frame)[glass] > 0)


def test_lidar_dropout_and_noise_act_per_material() -> None:
    rng = np.random.default_rng(3)
    scene = sc.build_scene(rng, -120.0, 300.0)
    pose = np.eye(4)
    pose[:3, 3] = (30.0, -1.75, 1.73)
    directions = lidar_directions(AZ, 64) @ pose[:3, :3].T
    t, obj, axis = sc.cast(scene, pose[:3, 3], directions, lidar_regions(scene, pose, AZ, 80.0, 64), 80.0)
    hit = np.isfinite(t).ravel()
    d, t, obj, axis = directions.reshape(-1, 3)[hit], t.ravel()[hit], obj.ravel()[hit], axis.ravel()[hit]
    glass = failures.glass_surface(scene, pose[:3, 3] + t[:, None] * d, obj, axis)
    dark = failures.dark_surface(scene, obj)
    assert glass.sum() > 100 and dark.sum() > 50, (glass.sum(), dark.sum())
    new_t, new_obj, keep = failures.lidar_returns(scene, pose[:3, 3], d, t, obj, axis,
                                                  FailureModes(lidar_dropout=True), np.random.default_rng(0), 80.0)
    # Glass: no return at the glass itself; a share returns from behind it (further, off any glass box).
    through = keep & glass
    assert np.all(new_t[through] > t[through]) and not np.any(scene.kind[np.maximum(new_obj[through], 0)] == sc.GLASS)
    assert 0.15 < np.mean(keep[glass]) < 0.35
    assert 0.25 < np.mean(keep[dark & ~glass]) < 0.55
    other = ~glass & ~dark
    assert np.all(keep[other]) and np.array_equal(new_t[other], t[other])
    noisy_t, _, keep = failures.lidar_returns(scene, pose[:3, 3], d, t, obj, axis, FailureModes(lidar_noise=0.03),
                                              np.random.default_rng(0), 80.0)
    inside = keep & (t < 79.0)
    assert abs(np.std(noisy_t[inside] - t[inside]) - 0.03) < 0.003 and abs(np.mean(noisy_t[inside] - t[inside])) < 0.003


def test_lidar_flags_change_only_the_lidar(clean: Path, tmp_path: Path) -> None:
    dropped = _drive(tmp_path / "d", lidar_dropout=True, lidar_noise=0.03)
    assert _only_changed(dropped, clean) == {"velodyne_points/data"}
    for frame in range(FRAMES):
        a = kitti.load_velodyne(dropped / "velodyne_points/data" / f"{frame:010d}.bin")
        b = kitti.load_velodyne(clean / "velodyne_points/data" / f"{frame:010d}.bin")
        assert 0.5 * len(b) < len(a) < len(b)
    assert _digest(_drive(tmp_path / "e", lidar_dropout=True, lidar_noise=0.03)) == _digest(dropped)  # deterministic


def test_textureless_changes_only_the_images_and_flattens_them(clean: Path, tmp_path: Path) -> None:
    flat = _drive(tmp_path, textureless=True)
    changed = _only_changed(flat, clean)
    assert changed <= {"image_02/data", "image_03/data", "proj_depth/regions"} and "image_02/data" in changed
    image = np.asarray(Image.open(flat / "image_02/data/0000000000.png")).astype(np.float64)
    gradient = np.abs(np.diff(image, axis=1)).sum(axis=2)[:-1] + np.abs(np.diff(image, axis=0)).sum(axis=2)[:, :-1]
    region = regions.region_mask(_labels(flat, 0), "textureless")
    interior = region[:-1, :-1] & region[1:, :-1] & region[:-1, 1:] & region[1:, 1:]
    others = (_gt(flat, 0)[:-1, :-1] > 0) & ~region[:-1, :-1]
    assert interior.sum() > 200
    assert np.median(gradient[interior]) < 0.25 * np.median(gradient[others])


def test_moving_cars_move_by_their_own_velocity_plus_ego_motion(tmp_path: Path) -> None:
    drive = _drive(tmp_path, moving_objects=6)
    poses = read_poses(drive / "poses.txt")
    velocities = np.loadtxt(drive / "moving_objects.txt", ndmin=2)
    assert velocities.shape == (12, 3) and np.all(np.abs(velocities[:, 0]) + np.abs(velocities[:, 2]) > 0.2)
    K = Rig(H, W).K
    checked = 0
    for frame in range(FRAMES - 1):
        moving = regions.region_mask(_labels(drive, frame), "moving")
        depth, depth_next = _gt(drive, frame), _gt(drive, frame + 1)
        rows, cols = np.nonzero(moving & (depth > 0))
        z = depth[rows, cols]
        camera = np.stack([(cols - K[0, 2]) / K[0, 0] * z, (rows - K[1, 2]) / K[1, 1] * z, z, np.ones_like(z)])
        world = poses[frame] @ camera

        def relative_error(velocity: np.ndarray) -> np.ndarray:
            moved = world.copy()
            moved[:3] += velocity[:, None]
            x, y, zz, _ = np.linalg.inv(poses[frame + 1]) @ moved
            u, v = np.round(K[0, 0] * x / zz + K[0, 2]).astype(int), np.round(K[1, 1] * y / zz + K[1, 2]).astype(int)
            inside = (zz > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            error = np.full(len(z), np.inf)
            error[inside] = np.abs(depth_next[v[inside], u[inside]] - zz[inside]) / zz[inside]
            return error

        own = np.min([relative_error(v) for v in velocities], axis=0)
        static = relative_error(np.zeros(3))
        assert np.mean(own < 0.01) > 0.7  # the car's own motion plus the ego-motion explains the next frame
        assert np.median(static) > 3 * np.median(own) and np.mean(static < 0.01) < 0.8 * np.mean(own < 0.01)
        checked += len(z)
    assert checked > 100


def test_make_shards_carries_the_region_labels(clean: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    from distill_depth.cli import main

    root = clean.parent.parent
    for name, size in (("native", []), ("half", ["--height", "32", "--width", "96"])):
        out = tmp_path / name
        assert main(["make-shards", "--kitti-root", str(root), "--out", str(out), "--no-progress", "--workers", "1",
                     *size]) == 0
        members = {}
        for shard in sorted(out.glob("*.tar")):
            with tarfile.open(shard) as tar:
                members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        labelled = sorted(k for k in members if k.endswith(".regions.png"))
        assert labelled and len(labelled) == sum(k.endswith(".json") for k in members)
        key = labelled[0][: -len(".regions.png")]
        frame = int(key.rsplit("_", 1)[1])
        stored = np.asarray(Image.open(io.BytesIO(members[labelled[0]])))
        expected = regions.resample_labels(_labels(clean, frame), (32, 96) if size else (H, W))
        np.testing.assert_array_equal(stored, expected)
    plain = _drive(tmp_path / "plain").parent.parent  # a tree without labels gives shards without the entry
    assert main(["make-shards", "--kitti-root", str(plain), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    for shard in (tmp_path / "p").glob("*.tar"):
        with tarfile.open(shard) as tar:
            assert not any(m.name.endswith(".regions.png") for m in tar.getmembers())


def test_bad_failure_mode_values_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill_depth.cli import main

    for flag, value, message in (("--moving-objects", "-1", "--moving-objects must be an integer >= 0"),
                                 ("--lidar-noise", "-0.1", "--lidar-noise must be a standard deviation")):
        assert main(["synth", "--out", str(tmp_path / "x"), flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
