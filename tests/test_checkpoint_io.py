"""``load_branches`` lives outside the trainer: evaluation and prediction load weights without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from distill_depth import checkpoint_io
from distill_depth.branches import build_branch
from distill_depth.config import load_config

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


def test_load_branches_reads_an_export_written_by_hand(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    from distill_depth.config import save_config

    cfg = load_config(None, [])
    torch.manual_seed(3)
    model = build_branch("S", cfg)
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    save_model(model, str(export / "S.safetensors"))
    save_config(cfg, export / "config.yaml")
    models, loaded = checkpoint_io.load_branches(tmp_path / "run", names=("S",))
    assert loaded.to_dict() == cfg.to_dict()
    assert not models["S"].training
    for (key, a), b in zip(model.state_dict().items(), models["S"].state_dict().values()):
        assert torch.equal(a, b), key
