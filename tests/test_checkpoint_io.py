"""``load_branches`` lives outside the trainer: evaluation and prediction load weights without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_model
from torch import nn

from distill_depth import checkpoint_io
from distill_depth.branches import build_branch
from distill_depth.config import load_config, save_config

REPO = Path(__file__).resolve().parent.parent


def test_evaluate_and_predict_do_not_import_the_trainer() -> None:
    # A fresh interpreter: this test process may already hold distill_depth.train from other tests.
    code = ("import sys, distill_depth.evaluate, distill_depth.predict, distill_depth.checkpoint_io; "
            "print(sorted(m for m in sys.modules if m.startswith('distill_depth.train')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_trainer_re_exports_the_same_objects() -> None:
    import distill_depth.train as train
    from distill_depth.train import checkpoint

    assert checkpoint.load_branches is checkpoint_io.load_branches is train.load_branches
    assert checkpoint.CheckpointError is checkpoint_io.CheckpointError
    assert checkpoint.complete_checkpoints is checkpoint_io.complete_checkpoints


@pytest.fixture(scope="module")
def s_only_run(module_tmp_path: Path) -> tuple[Path, nn.Module]:
    """A run folder whose export holds an untrained S, written by hand (no training needed)."""
    cfg = load_config(None, ["branches=[S]"])
    torch.manual_seed(3)
    model = build_branch("S", cfg)
    run = module_tmp_path / "s_only" / "run"
    (run / "export").mkdir(parents=True)
    save_model(model, str(run / "export" / "S.safetensors"))
    save_config(cfg, run / "export" / "config.yaml")
    return run, model


def test_load_branches_reads_an_export_written_by_hand(s_only_run) -> None:
    run, model = s_only_run
    models, loaded = checkpoint_io.load_branches(run, names=("S",))
    assert loaded.branches == ("S",)
    assert not models["S"].training
    for (key, a), b in zip(model.state_dict().items(), models["S"].state_dict().values()):
        assert torch.equal(a, b), key


def test_evaluate_and_predict_load_through_checkpoint_io(s_only_run, tmp_path: Path) -> None:
    from distill_depth.cli import main
    from distill_depth.evaluate import _load

    run, _ = s_only_run
    models, _ = _load(str(run), "auto", torch.device("cpu"))  # a single-branch run: S only
    assert set(models) == {"S"}
    image = tmp_path / "street.png"
    Image.fromarray(np.full((40, 90, 3), 128, dtype=np.uint8)).save(image)
    rc = main(["predict", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "out"),
               "--branch", "S", "--format", "npy", "--height", "32", "--width", "64"])
    assert rc == 0
    assert np.load(tmp_path / "out" / "street_S.npy").shape == (40, 90)
