"""`evaluate --wandb` with a real offline W&B run, read back from the files it wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distill_depth.cli import main
from distill_depth.evaluation.wandb_log import COLUMNS, TABLE_KEY
from tests.trained_checkpoint import trained_run
from tests.wandb_log import final_summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_shards) -> Path:
    return trained_run(tmp_path_factory, bundled_shards)


def test_evaluate_logs_the_per_image_table_to_an_offline_run(run_dir, bundled_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    report_file = tmp_path / "eval.json"
    shards = str(bundled_shards / "val" / "shard-{000000..000000}.tar")  # 10 samples
    assert main(["evaluate", "--checkpoint", str(run_dir), "--shards", shards, "--protocol", "dense", "--branch", "S",
                 "--json", str(report_file), "--wandb"]) == 0
    assert "logged the per-image table to W&B" in capsys.readouterr().out
    report = json.loads(report_file.read_text())

    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    (table_file,) = (run_folder / "files" / "media" / "table").glob(f"{TABLE_KEY}_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(COLUMNS)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == len(report["per_image"]) == 10
    for logged, expected in zip(rows, report["per_image"]):
        assert (logged["key"], logged["output"]) == (expected["key"], "S")
        assert logged["valid_pixels"] == expected["valid_pixels"] > 0
        assert math.isclose(logged["abs_rel"], expected["abs_rel"], rel_tol=1e-9)
    summary = final_summary(next(run_folder.glob("run-*.wandb")))
    assert math.isclose(summary["S/abs_rel"], report["mean"]["S"]["abs_rel"], rel_tol=1e-9)
