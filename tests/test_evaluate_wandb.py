"""`evaluate --wandb` with a real offline W&B run, read back from the files it wrote."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from distill_depth.cli import main
from distill_depth.evaluation.wandb_log import COLUMNS, TABLE_KEY
from tests.trained_checkpoint import trained_run


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
    # Offline runs keep the summary only in the binary run-*.wandb log (wandb 0.31 has no public
    # reader): a summary item there is the key, a 2-3 byte field header, then the value as JSON.
    (log_file,) = run_folder.glob("run-*.wandb")
    found = re.search(rb"S/abs_rel[^-0-9]{1,4}(-?[0-9][0-9.eE+-]*)", log_file.read_bytes())
    assert found, "the mean S/abs_rel is not in the run's summary"
    assert math.isclose(float(found.group(1)), report["mean"]["S"]["abs_rel"], rel_tol=1e-9)
