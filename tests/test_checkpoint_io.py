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


def _hand_export(folder: Path, overrides: list[str], seed: int, branch: str = "S") -> tuple[Path, nn.Module]:
    cfg = load_config(None, [f"branches=[{branch}]", *overrides])
    torch.manual_seed(seed)
    model = build_branch(branch, cfg)
    (folder / "export").mkdir(parents=True)
    for key in model.run_state_keys:
        if key in model.state_dict():
            getattr(model, key).fill_(0.3)  # a source run's running state, which must not travel
    save_model(model, str(folder / "export" / f"{branch}.safetensors"))
    save_config(cfg, folder / "export" / "config.yaml")
    return folder, model


RUN_STATE = {"partner_trust": ("loss.partner_trust=lidar", 1.0), "lidar_reach": ("loss.distill_regions=by_sensor_coverage", None)}
"""S's run state → (the option that creates it, its fresh value; None = NaN, "not measured yet")."""


@pytest.mark.parametrize("state", sorted(RUN_STATE))
@pytest.mark.parametrize("source_has, target_has", [(False, True), (True, False), (True, True)])
def test_init_weights_skip_the_run_state_of_either_side(tmp_path: Path, state: str, source_has: bool,
                                                        target_has: bool) -> None:
    """train.init_s from a run with or without an option that keeps run state (S's running trust,
    the LiDAR's running reach) into one with or without it: every learnt tensor is the source's;
    the state is the new run's own fresh value (the stage-2 runs of the fidelity benchmark failed on
    the missing key before)."""
    option, fresh = RUN_STATE[state]
    source, model = _hand_export(tmp_path / "src", [option] if source_has else [], seed=3)
    torch.manual_seed(4)
    target = build_branch("S", load_config(None, ["branches=[S]", *([option] if target_has else [])]))
    read = checkpoint_io.init_branch_weights(target, "S", source, torch.device("cpu"))
    assert read == source / "export" / "S.safetensors"
    loaded = target.state_dict()
    for key, value in model.state_dict().items():
        if key != state:
            assert torch.equal(value, loaded[key]), key
    assert (state in loaded) == target_has
    if target_has:
        assert (loaded[state].isnan().all() if fresh is None else (loaded[state] == fresh).all())


@pytest.mark.parametrize("other", ["model.num_scales=3", "model.encoder=resnet34", "model.max_depth=80"])
def test_init_weights_of_another_architecture_name_the_file(tmp_path: Path, other: str) -> None:
    """Fewer decoder heads (missing keys), another encoder (other keys and shapes): an error naming
    the file. A setting that changes no tensor (the depth range) loads."""
    source, _ = _hand_export(tmp_path / "src", [other], seed=3)
    target = build_branch("S", load_config(None, ["branches=[S]"]))
    if other.startswith("model.max_depth"):
        checkpoint_io.init_branch_weights(target, "S", source, torch.device("cpu"))
        return
    with pytest.raises(checkpoint_io.CheckpointError, match=r"train.init_s: .*S.safetensors does not fit branch S"):
        checkpoint_io.init_branch_weights(target, "S", source, torch.device("cpu"))


def test_init_u_with_a_lidar_trained_confidence_from_a_u_without_one_names_the_file(tmp_path: Path) -> None:
    """loss.u_confidence_target=lidar adds U's ErrorConfidenceNet: a second stage with it cannot start
    from a U trained without it (its keys are missing), and says which file; the other way round
    (the net dropped) is refused the same way rather than silently losing learnt weights."""
    lidar = ["loss.u_confidence_target=lidar"]
    plain, _ = _hand_export(tmp_path / "plain", [], seed=3, branch="U")
    target = build_branch("U", load_config(None, ["branches=[U]", *lidar]))
    with pytest.raises(checkpoint_io.CheckpointError, match=r"train.init_u: .*plain/export/U.safetensors"):
        checkpoint_io.init_branch_weights(target, "U", plain, torch.device("cpu"))
    with_net, model = _hand_export(tmp_path / "with_net", lidar, seed=3, branch="U")
    checkpoint_io.init_branch_weights(target, "U", with_net, torch.device("cpu"))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(checkpoint_io.CheckpointError, match=r"train.init_u: .*with_net/export/U.safetensors"):
        checkpoint_io.init_branch_weights(build_branch("U", load_config(None, ["branches=[U]"])), "U", with_net,
                                          torch.device("cpu"))
