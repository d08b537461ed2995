"""benchmarks/teacher_oracle.py: the per-pixel oracle and the confidence rules on constructed maps
whose answers are known, and the script end to end on synthetic shards against `evaluate`'s saved
predictions."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_depth.cli import main as cli_main
from trained_checkpoint import trained_run

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("teacher_oracle", REPO / "benchmarks" / "teacher_oracle.py")
teacher_oracle = importlib.util.module_from_spec(SPEC)
sys.modules["teacher_oracle"] = teacher_oracle
SPEC.loader.exec_module(teacher_oracle)


def _halves(left: float, right: float, h: int = 4, w: int = 8) -> torch.Tensor:
    out = torch.full((1, 1, h, w), left)
    out[..., w // 2:] = right
    return out


def _row(depth_s, conf_s, depth_u, conf_u, fused, gt) -> dict[str, float]:
    columns = teacher_oracle.pixel_table(depth_s, conf_s, depth_u, conf_u, fused, gt)
    return teacher_oracle.summarise({k: v.flatten() for k, v in columns.items()})


def test_oracle_and_rules_on_halves_with_known_answers() -> None:
    """S exact on the left half and 1.5x off on the right, U the reverse: U is better on exactly half
    the pixels, and picking by that oracle is exact. A U confidence that is low where U is wrong makes
    ``relative`` agree everywhere; a U confidence of 1 everywhere makes it pick U everywhere."""
    gt = torch.full((1, 1, 4, 8), 10.0)
    depth_s, depth_u = _halves(10.0, 15.0), _halves(15.0, 10.0)
    conf_s = torch.full_like(gt, 0.6)
    fused = (depth_s + depth_u) / 2
    knowing = _row(depth_s, conf_s, depth_u, _halves(0.3, 0.9), fused, gt)
    assert knowing["u_better"] == pytest.approx(0.5)
    assert knowing["abs_rel_s"] == pytest.approx(0.25) and knowing["abs_rel_u"] == pytest.approx(0.25)
    assert knowing["abs_rel_pick_oracle"] == pytest.approx(0.0)
    assert knowing["agree_relative"] == pytest.approx(1.0) and knowing["abs_rel_pick_relative"] == pytest.approx(0.0)
    assert knowing["abs_rel_fused"] == pytest.approx(0.25)

    saturated = _row(depth_s, conf_s, depth_u, torch.ones_like(gt), fused, gt)
    assert saturated["picks_u_relative"] == pytest.approx(1.0)
    assert saturated["agree_relative"] == pytest.approx(0.5)
    assert saturated["abs_rel_pick_relative"] == pytest.approx(saturated["abs_rel_u"])


def test_percentile_within_image_ranks_each_image_separately() -> None:
    confidence = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]], [[[5.0, 1.0], [3.0, 2.0]]]])
    ranks = teacher_oracle.percentile_within_image(confidence)
    assert ranks[0].flatten().tolist() == [0.0, 0.75, 0.5, 0.25]
    assert ranks[1].flatten().tolist() == [0.75, 0.0, 0.5, 0.25]


@pytest.mark.slow
def test_script_matches_evaluates_saved_predictions(tmp_path_factory, bundled_shards, tmp_path, run_benchmark) -> None:
    run_dir = trained_run(tmp_path_factory, bundled_shards)
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    assert cli_main(["synth", "--out", str(raw), "--drives", "1", "--frames", "4", "--height", "64", "--width", "192",
                     "--beams", "22", "--azimuth-steps", "1000", "--moving-objects", "3", "--lidar-dropout",
                     "--textureless"]) == 0
    assert cli_main(["make-shards", "--kitti-root", str(raw), "--out", str(shards), "--no-progress",
                     "--workers", "1"]) == 0
    predictions = tmp_path / "pred"
    assert cli_main(["evaluate", "--checkpoint", str(run_dir), "--shards", str(shards), "--protocol", "dense",
                     "--branch", "both", "--save-predictions", str(predictions)]) == 0

    out = tmp_path / "oracle.json"
    result = run_benchmark("teacher_oracle.py", "--checkpoint", str(run_dir), "--shards", str(shards),
                           "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "above_top_beam" in result.stdout and "pick oracle" in result.stdout
    rows = json.loads(out.read_text())

    # recompute the "all" row from evaluate's own final depths and the shards' ground truth
    errors: dict[str, list[np.ndarray]] = {"S": [], "U": []}
    for shard in shards.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".gt.png"):
                    key = member.name[: -len(".gt.png")]
                    gt = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())), dtype=np.float64) / 256.0
                    valid = (gt > 1e-3) & (gt < 80.0)
                    for branch in errors:
                        depth = np.load(predictions / f"{key}_{branch}.npy").astype(np.float64)
                        errors[branch].append(np.abs(depth - gt)[valid] / gt[valid])
    error_s, error_u = np.concatenate(errors["S"]), np.concatenate(errors["U"])
    assert rows["all"]["pixels"] == error_s.size
    assert rows["all"]["abs_rel_s"] == pytest.approx(error_s.mean(), rel=1e-4)
    assert rows["all"]["abs_rel_u"] == pytest.approx(error_u.mean(), rel=1e-4)
    assert rows["all"]["u_better"] == pytest.approx((error_u < error_s).mean(), abs=1e-3)
    assert rows["all"]["abs_rel_pick_oracle"] == pytest.approx(np.minimum(error_s, error_u).mean(), rel=1e-4)
    assert rows["all"]["abs_rel_pick_oracle"] <= min(rows["all"]["abs_rel_s"], rows["all"]["abs_rel_u"])
