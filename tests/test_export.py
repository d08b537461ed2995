"""`distill-depth export`: a real briefly trained branch to ONNX, run by onnxruntime beside PyTorch
(dynamic batch, real KITTI frames), and the docs' torch-free example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_depth.checkpoint_io import load_branches
from distill_depth.cli import main
from distill_depth.export import ExportError, export_size, verify_onnx
from tests.trained_checkpoint import REPO, child_env, trained_run

onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -e '.[export]')")
onnx = pytest.importorskip("onnx", reason="the export extra is not installed (pip install -e '.[export]')")

KITTI_FRAMES = [f"udacity_sfnd/2011_09_26/2011_09_26_drive_unknown_sync/image_02/data/{i:010d}.png" for i in (0, 1, 2)]
SIZE = (64, 192)  # not the training size (96x320): --height/--width are honoured


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_shards) -> Path:
    return trained_run(tmp_path_factory, bundled_shards)


@pytest.fixture(scope="module")
def exported(run_dir, module_tmp_path) -> tuple[Path, str]:
    """(ONNX file of branch U at 64x192, the command's stdout)."""
    out = module_tmp_path / "export" / "nested" / "depth_U.onnx"
    command = [sys.executable, "-m", "distill_depth.cli", "export", "--checkpoint", str(run_dir),
               "--onnx", str(out), "--branch", "U", "--height", str(SIZE[0]), "--width", str(SIZE[1])]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _kitti_batch(sample_data: Path) -> np.ndarray:
    images = [Image.open(sample_data / name).convert("RGB").resize(SIZE[::-1], Image.BILINEAR) for name in KITTI_FRAMES]
    return np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def test_export_matches_pytorch_on_real_frames_at_another_batch_size(exported, run_dir, sample_data):
    path, stdout = exported
    reported = re.search(r"max \|depth difference\| (\S+) m, max \|confidence difference\| (\S+)", stdout)
    assert reported, stdout
    assert float(reported.group(1)) < 1e-2 and float(reported.group(2)) < 1e-3
    assert not list(path.parent.glob(".*tmp*")), "the temporary file was left behind"
    model = onnx.load(str(path))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["branch"] == "U" and (metadata["height"], metadata["width"]) == ("64", "192")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image" and not isinstance(image_input.shape[0], int)  # dynamic batch
    assert image_input.shape[1:] == [3, *SIZE]
    assert [o.name for o in session.get_outputs()] == ["depth", "confidence"]

    batch = _kitti_batch(sample_data)  # 3 frames: a batch size the export's own check did not use
    onnx_depth, onnx_confidence = session.run(None, {"image": batch})
    models, _ = load_branches(run_dir, names=("U",))
    with torch.no_grad():
        depth, confidence = (t.numpy() for t in models["U"].infer(torch.from_numpy(batch)))
    assert onnx_depth.shape == onnx_confidence.shape == (3, 1, *SIZE)
    np.testing.assert_allclose(onnx_depth, depth, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(onnx_confidence, confidence, rtol=0, atol=1e-4)
    assert (depth > 0).all() and np.ptp(depth) > 0  # a real depth map, not a constant both sides agree on


def test_the_check_fails_for_a_network_that_differs_from_the_graph(exported, run_dir):
    models, _ = load_branches(run_dir, names=("U",))
    branch = models["U"]
    assert verify_onnx(branch, exported[0], SIZE).within_tolerance
    with torch.no_grad():
        branch.depth_net.decoder.disp_heads["1"][0].bias += 0.05  # a small change of the full-resolution head
    check = verify_onnx(branch, exported[0], SIZE)
    assert not check.within_tolerance and check.max_depth_diff > 1e-2


def test_docs_example_runs_the_onnx_file_without_torch(exported, sample_data, tmp_path):
    page = (REPO / "docs" / "evaluation.md").read_text()
    example = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", page, re.S)
    assert example, "docs/evaluation.md lost its ONNX example"
    (tmp_path / "depth_S.onnx").symlink_to(exported[0])
    (tmp_path / "street.jpg").write_bytes((sample_data / KITTI_FRAMES[0]).read_bytes())
    # torch cannot be imported in this process: the example needs only onnxruntime, numpy and pillow
    script = ("import sys; sys.modules['torch'] = None\n" + example.group(1)
              + "\nassert depth.shape == (image.height, image.width) and np.isfinite(depth).all() and (depth > 0).all()"
              + "\nassert confidence.shape == (1, 1) + tuple(session.get_inputs()[0].shape[2:])\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_export_size_rules():
    assert export_size((96, 320), None, None) == (96, 320)
    assert export_size(None, 64, 192) == (64, 192)
    with pytest.raises(ExportError, match="--width 200: must be a positive multiple of 32"):
        export_size((96, 320), 64, 200)
    with pytest.raises(ExportError, match="give both"):
        export_size((96, 320), 64, None)
    with pytest.raises(ExportError, match="give --height and --width"):
        export_size(None, None, None)


def test_a_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
