"""Evaluation: protocol presets, known answers with analytic branches, and a real trained checkpoint
(JSON complete for both branches, 2-process evaluation identical to 1-process)."""

from __future__ import annotations

import json
from dataclasses import replace
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_depth.config import Config
from distill_depth.evaluation.inference import fuse, infer_at_size, needs_median_scaling, network_size
from distill_depth.evaluation.protocol import (
    PROTOCOLS,
    EvaluationError,
    evaluation_mask,
    ground_truth,
    get_protocol,
)
from distill_depth.evaluation.runner import EvalSettings, evaluate_stream
from distill_depth.metrics import METRIC_NAMES, depth_metrics
from distill_depth.types import Batch


class ScaledTruth(torch.nn.Module):
    """An analytic 'branch': depth = factor × a fixed depth map, constant confidence."""

    def __init__(self, depth: torch.Tensor, factor: float, confidence: float) -> None:
        super().__init__()
        self.depth, self.factor, self.confidence = depth, factor, confidence

    def infer(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        depth = torch.nn.functional.interpolate(self.depth, size=image.shape[-2:], mode="nearest") * self.factor
        return depth, torch.full_like(depth, self.confidence)


def _batch(gt: torch.Tensor, sparse: torch.Tensor | None = None) -> Batch:
    b, _, h, w = gt.shape
    return Batch(
        image=torch.rand(b, 3, h, w), sources={}, sparse_depth=gt.clone() if sparse is None else sparse,
        K=torch.eye(3).expand(b, 3, 3), keys=[f"drive_l_{i:010d}" for i in range(b)], gt_depth=gt,
    )


def _gt(b: int = 2, h: int = 32, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(b, 1, h, w, generator=g) * 37 + 2  # 2x stays inside the 80 m clamp
    gt[:, :, :4] = 0  # "sky": no ground truth
    return gt


def test_protocol_presets():
    assert PROTOCOLS["eigen"].ground_truth == "sparse_depth" and PROTOCOLS["eigen"].garg_crop
    assert PROTOCOLS["eigen_benchmark"].ground_truth == "gt_depth" and not PROTOCOLS["eigen_benchmark"].garg_crop
    assert PROTOCOLS["dense"].ground_truth == "gt_depth"
    assert all((p.min_depth, p.max_depth) == (1e-3, 80.0) for p in PROTOCOLS.values())
    with pytest.raises(EvaluationError, match="unknown protocol"):
        get_protocol("kitti")
    batch = _batch(_gt())
    batch.gt_depth = None
    with pytest.raises(EvaluationError, match="gt.png"):
        ground_truth(batch, PROTOCOLS["dense"])
    gt = torch.full((1, 1, 375, 1242), 10.0)
    assert evaluation_mask(gt, PROTOCOLS["eigen"]).sum().item() == (371 - 153) * (1197 - 44)
    assert evaluation_mask(gt, PROTOCOLS["dense"]).all()


def test_median_scaling_auto_only_for_a_u_without_metric_signal():
    """auto: S and the fusion never; U when nothing metric reached it (no stereo, no S→U distillation)."""
    cfg = Config()
    assert [needs_median_scaling(cfg, "auto", o) for o in ("S", "U", "fused")] == [False, False, False]
    for direction, scaled in (("both", False), ("u_from_s", False), ("s_from_u", True), ("none", True)):
        cfg.loss.distill_direction = direction
        assert needs_median_scaling(cfg, "auto", "U") is scaled, direction
        assert not needs_median_scaling(cfg, "auto", "S")
    cfg.loss.distill_direction = "both"
    cfg.branches = ("U",)
    assert needs_median_scaling(cfg, "auto", "U")
    cfg.data.u_sources = "temporal+stereo"
    assert not needs_median_scaling(cfg, "auto", "U")
    assert needs_median_scaling(cfg, "on", "S") and not needs_median_scaling(Config(), "off", "U")


def test_fusion_formula():
    d_s, d_u = torch.full((1, 1, 2, 2), 4.0), torch.full((1, 1, 2, 2), 16.0)
    c_s, c_u = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)
    depth, conf = fuse(d_s, c_s, d_u, c_u, align_u_scale=False)
    assert torch.allclose(depth, torch.full_like(depth, 8.0))  # geometric mean at equal confidence
    assert torch.allclose(conf, c_s)
    depth, _ = fuse(d_s, torch.full_like(c_s, 0.9), d_u, torch.full_like(c_u, 0.1), align_u_scale=False)
    assert torch.allclose(depth, torch.full_like(depth, math.exp(0.9 * math.log(4) + 0.1 * math.log(16))))
    depth, _ = fuse(d_s, c_s, d_u, c_u, align_u_scale=True)  # U rescaled to S's median first
    assert torch.allclose(depth, d_s)


def test_inference_resizes_in_and_out():
    assert network_size((375, 1242), None) == (384, 1248)
    assert network_size((375, 1242), (96, 320)) == (96, 320)
    seen = {}

    class Probe(torch.nn.Module):
        def infer(self, image):
            seen["size"] = tuple(image.shape[-2:])
            x = torch.linspace(1, 2, image.shape[-1]).view(1, 1, 1, -1).expand(image.shape[0], 1, image.shape[-2], -1)
            return x.contiguous(), torch.full_like(x, 0.5)

    depth, conf = infer_at_size(Probe(), torch.rand(1, 3, 50, 70), (32, 64))
    assert seen["size"] == (32, 64) and depth.shape == (1, 1, 50, 70) and conf.shape == (1, 1, 50, 70)
    flipped, _ = infer_at_size(Probe(), torch.rand(1, 3, 32, 64), (32, 64), flip_tta=True)
    # A left-right ramp averaged with its mirror (geometric mean) becomes symmetric.
    assert torch.allclose(flipped, flipped.flip(-1), atol=1e-6)


def test_known_answers_and_saved_predictions(tmp_path):
    gt = _gt()
    models = {"S": ScaledTruth(gt, 1.0, 0.9), "U": ScaledTruth(gt, 2.0, 0.5)}
    settings = EvalSettings(PROTOCOLS["dense"], ("S", "U", "fused"),
                            median_scaling={"S": False, "U": False, "fused": False}, save_predictions=tmp_path / "pred")
    records = evaluate_stream(models, [_batch(gt)], settings, torch.device("cpu"))
    by = {(r["key"], r["output"]): r for r in records}
    assert len(records) == 6
    s = by[("drive_l_0000000000", "S")]
    assert s["abs_rel"] == 0.0 and s["rmse"] == 0.0 and s["a1"] == 1.0 and s["scale"] == 1.0
    u = by[("drive_l_0000000001", "U")]
    assert u["abs_rel"] == pytest.approx(1.0) and u["a1"] == 0.0 and u["a3"] == 0.0  # 2x everywhere
    # The saved npy is exactly what the metrics saw: recomputing from it gives the same numbers.
    for key, output in [("drive_l_0000000001", "U"), ("drive_l_0000000000", "fused")]:
        saved = torch.from_numpy(np.load(tmp_path / "pred" / f"{key}_{output}.npy"))[None, None]
        target = gt[int(key[-1]) : int(key[-1]) + 1]
        mask = evaluation_mask(target, PROTOCOLS["dense"])
        again = depth_metrics(saved, target, mask)
        assert all(again[m].item() == pytest.approx(by[(key, output)][m], rel=1e-9) for m in METRIC_NAMES)
    # Median scaling on makes the 2x prediction perfect and reports the ratio.
    settings = EvalSettings(PROTOCOLS["dense"], ("U",), median_scaling={"U": True})
    (r, _) = evaluate_stream(models, [_batch(gt)], settings, torch.device("cpu"))
    assert r["abs_rel"] < 1e-6 and r["scale"] == pytest.approx(0.5)


def test_eigen_protocol_uses_lidar_and_crop():
    gt = _gt(1, 40, 80)
    lidar = torch.zeros_like(gt)
    lidar[..., 30, 10:70:7] = 12.0  # a few LiDAR points inside the crop rows
    settings = EvalSettings(PROTOCOLS["eigen"], ("S",), median_scaling={"S": False})
    models = {"S": ScaledTruth(torch.full_like(gt, 12.0), 1.0, 1.0)}
    (record,) = evaluate_stream(models, [_batch(gt, sparse=lidar)], settings, torch.device("cpu"))
    cols = [c for c in range(10, 70, 7) if int(0.03594771 * 80) <= c < int(0.96405229 * 80)]
    assert record["valid_pixels"] == len(cols) and record["abs_rel"] == 0.0


# --------------------------------------------------------------------------------------------
# A real checkpoint (2 training steps on the bundled shards), real shards, real processes.

from tests.trained_checkpoint import child_env, trained_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_shards) -> Path:
    return trained_run(tmp_path_factory, bundled_shards)


def _val_subset(bundled_shards: Path) -> str:
    """The first bundled val shard (10 samples), as a one-shard brace pattern: keeps the test short."""
    return str(bundled_shards / "val" / "shard-{000000..000000}.tar")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_checkpoint_report_has_every_metric_for_both_branches(run_dir, bundled_shards, tmp_path, capsys):
    from distill_depth.cli import main

    out = tmp_path / "one.json"
    rc = main(["evaluate", "--checkpoint", str(run_dir), "--shards", _val_subset(bundled_shards),
               "--protocol", "dense", "--json", str(out), "--save-predictions", str(tmp_path / "pred"),
               "--batch-size", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "median scaling S off, U off, fused off (auto)" in printed and "AbsRel" in printed
    report = json.loads(out.read_text())
    assert report["outputs"] == ["S", "U", "fused"] and report["median_scaling"] == {
        "mode": "auto", "applied": {"S": False, "U": False, "fused": False}}
    for branch in ("S", "U", "fused"):
        mean = report["mean"][branch]
        assert all(isinstance(mean[m], float) and math.isfinite(mean[m]) for m in METRIC_NAMES + ("ause", "aurg"))
        assert mean["num_images"] == report["num_images"] > 0
    keys = sorted({r["key"] for r in report["per_image"]})
    assert len(report["per_image"]) == 3 * len(keys)
    assert len(list((tmp_path / "pred").glob("*.npy"))) == 3 * len(keys)
    # 2 processes (torchrun, gloo): every sample once, the same numbers as 1 process.
    two = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "distill_depth.cli", "evaluate", "--checkpoint", str(run_dir),
               "--shards", _val_subset(bundled_shards), "--protocol", "dense", "--json", str(two), "--batch-size", "2"]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report_two = json.loads(two.read_text())
    assert report_two["world_size"] == 2 and report_two["num_images"] == report["num_images"]
    assert [(r["key"], r["output"]) for r in report_two["per_image"]] == [(r["key"], r["output"]) for r in report["per_image"]]
    # AUSE and AURG sort pixels by confidence: batch 3 vs 2 may pick other convolution kernels
    # (seen on AMD EPYC, not on Intel), moving confidences by ~1e-7 and swapping near-ties, which
    # moved one image's AUSE and AURG by 6e-6 (AbsRel units; AURG is ~2e-3 there, so a relative
    # bound cannot hold). The depth metrics must agree to 1e-5 relative.
    for a, b in zip(report["per_image"], report_two["per_image"]):
        for metric in METRIC_NAMES + ("scale",):
            assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-7), (a["key"], a["output"], metric)
        for metric in ("ause", "aurg"):
            assert b[metric] == pytest.approx(a[metric], rel=0, abs=1e-4), (a["key"], a["output"], metric)


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error_and_protocol_is_reported(run_dir, bundled_shards, tmp_path, capsys):
    from distill_depth.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--shards", str(bundled_shards / "val")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(run_dir), "--shards", str(bundled_shards / "val" / "shard-000000.tar"),
                 "--branch", "U", "--median-scaling", "on", "--protocol", "eigen", "--json", str(tmp_path / "u.json")]) == 0
    report = json.loads((tmp_path / "u.json").read_text())
    assert report["outputs"] == ["U"] and report["median_scaling"]["applied"] == {"U": True}
    assert report["protocol"] == {"name": "eigen", "ground_truth": "depth.png", "garg_crop": True,
                                  "min_depth": 1e-3, "max_depth": 80.0}


def test_corrupt_checkpoint_is_a_one_line_error_for_evaluate_and_predict(run_dir, bundled_shards, tmp_path, capsys):
    """A checkpoint whose S weights were cut short after COMPLETE, an export with a flipped byte:
    evaluate and predict stop with one line naming the file (exit 2), no traceback."""
    import shutil

    from PIL import Image

    from distill_depth.cli import main
    from distill_depth.train.checkpoint import complete_checkpoints

    checkpoint = shutil.copytree(complete_checkpoints(run_dir)[-1], tmp_path / "step")
    weights = checkpoint / "S" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--shards", _val_subset(bundled_shards)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err and "truncated" in err, err
    export = shutil.copytree(run_dir / "export", tmp_path / "export")
    data = bytearray((export / "U.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (export / "U.safetensors").write_bytes(bytes(data))
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(export), "--branch", "U", "--out", str(tmp_path / "pred"), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(export / "U.safetensors") in err and "sha256" in err, err


def test_regions_report_every_metric_per_region_and_absent_regions(tmp_path):
    from distill_depth.data.regions import REGION_BITS
    from distill_depth.evaluation.report import summarize_regions

    gt = _gt()
    labels = torch.zeros(gt.shape, dtype=torch.uint8)
    labels[:, :, :16] |= REGION_BITS["moving"]  # rows 0..3 have no ground truth: partly valid
    labels[:, :, :4] |= REGION_BITS["above_top_beam"]  # only on sky: absent
    labels[0, :, 20:, :10] |= REGION_BITS["textureless"]  # in image 0 only
    batch = replace(_batch(gt), regions=labels)
    models = {"U": ScaledTruth(gt * (1 + torch.rand(gt.shape, generator=torch.Generator().manual_seed(1))), 1.0, 0.5)}
    settings = EvalSettings(PROTOCOLS["dense"], ("U",), median_scaling={"U": True}, regions=True,
                            save_predictions=tmp_path)
    records = evaluate_stream(models, [batch], settings, torch.device("cpu"))
    summary = summarize_regions(records, ("U",))["U"]
    assert summary["above_top_beam"] == {"absent": True, "num_images": 0}
    assert summary["textureless"]["num_images"] == 1 and summary["moving"]["num_images"] == 2
    for record in records:
        i = int(record["key"][-1])
        saved = torch.from_numpy(np.load(tmp_path / f"{record['key']}_U.npy"))[None, None]
        for region, bit in REGION_BITS.items():
            mask = evaluation_mask(gt[i : i + 1], PROTOCOLS["dense"]) & ((labels[i : i + 1] & bit) != 0)
            assert record["regions"][region]["valid_pixels"] == int(mask.sum())
            if mask.any():
                again = depth_metrics(saved, gt[i : i + 1], mask)
                assert all(again[m].item() == pytest.approx(record["regions"][region][m], rel=1e-9)
                           for m in METRIC_NAMES)
    moving = [r["regions"]["moving"]["abs_rel"] for r in records]
    assert summary["moving"]["abs_rel"] == pytest.approx(sum(moving) / 2)
    with pytest.raises(EvaluationError, match="regions.png"):
        evaluate_stream(models, [_batch(gt)], settings, torch.device("cpu"))


@pytest.mark.slow
def test_evaluate_regions_on_synthetic_shards_matches_saved_predictions(run_dir, tmp_path, capsys):
    import io
    import tarfile

    from PIL import Image

    from distill_depth.cli import main
    from distill_depth.data.regions import REGION_BITS

    assert main(["synth", "--out", str(tmp_path / "raw"), "--drives", "1", "--frames", "4", "--height", "64",
                 "--width", "192", "--beams", "22", "--azimuth-steps", "1000", "--moving-objects", "3",
                 "--lidar-dropout", "--lidar-noise", "0.03", "--textureless"]) == 0
    assert main(["make-shards", "--kitti-root", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"),
                 "--no-progress", "--workers", "1"]) == 0
    out = tmp_path / "r.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--shards", str(tmp_path / "shards"), "--protocol",
                 "dense", "--regions", "--json", str(out), "--save-predictions", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    assert "per region, output S" in printed and "on_lidar_row" in printed
    report = json.loads(out.read_text())
    members = {}
    for shard in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for output in report["outputs"]:
        assert set(report["regions"][output]) == set(REGION_BITS)
        for region, bit in REGION_BITS.items():
            values = []
            for key in sorted({r["key"] for r in report["per_image"]}):
                gt = np.asarray(Image.open(io.BytesIO(members[f"{key}.gt.png"]))).astype(np.float32) / 256.0
                labels = np.asarray(Image.open(io.BytesIO(members[f"{key}.regions.png"])))
                pred = np.load(tmp_path / "pred" / f"{key}_{output}.npy")
                mask = (gt > 1e-3) & (gt < 80) & ((labels & bit) != 0)
                if mask.any():
                    values.append(np.mean(np.abs(pred[mask] - gt[mask]) / gt[mask]))
            row = report["regions"][output][region]
            if values:
                assert row["num_images"] == len(values) and row["abs_rel"] == pytest.approx(np.mean(values), rel=1e-5)
            else:
                assert row == {"absent": True, "num_images": 0}
