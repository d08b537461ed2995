"""scripts/render_docs_images.py on a real (briefly) trained run and the bundled validation shards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trained_checkpoint import trained_run

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("render_docs_images", REPO / "scripts" / "render_docs_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_renders_the_curve_and_one_panel_row_per_validation_sample(tmp_path_factory, bundled_shards, tmp_path) -> None:
    run = trained_run(tmp_path_factory, bundled_shards)
    script = _script()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if not any("S/loss" in row for row in rows):
        pytest.skip("the shared 2-step run logged no loss row")
    out = tmp_path / "img"
    assert script.main([str(run), "--val-shards", str(bundled_shards / "val"), "--out", str(out)]) == 0
    curve = Image.open(out / "training_curve.png")
    assert curve.size[0] > 200 and curve.size[1] > 100
    panels = np.asarray(Image.open(out / "training_panels.png").convert("RGB"))
    batch = script.fixed_panel_batch(str(bundled_shards / "val"), torch.device("cpu"))
    n, _, height, width = batch.image.shape
    # n rows (input | S, U depth | S, U confidence | LiDAR), 2-pixel white gaps between rows and panels
    assert panels.shape == (n * height + 2 * (n - 1), 6 * width + 5 * 2, 3)
    assert panels[height: height + 2].min() == 255
    assert panels[:height, :width].std() > 0  # the input image, not a blank


def test_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys) -> None:
    assert _script().main([str(tmp_path)]) == 2
    assert "no training log" in capsys.readouterr().err
