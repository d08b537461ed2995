"""The shipped accelerate launch files and training configs parse (accelerate's and our loader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_depth.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCH = {"cpu_2proc.yaml": (2, 1), "1gpu.yaml": (1, 1), "8gpu.yaml": (8, 1), "deepspeed_zero2.yaml": (8, 1),
          "multinode.yaml": (16, 2)}


@pytest.mark.parametrize("name", sorted(LAUNCH))
def test_accelerate_launch_file_parses(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "launch" / "accelerate" / name))
    assert (config.num_processes, config.num_machines) == LAUNCH[name]


@pytest.mark.parametrize("name", ["default", "kitti_eigen_zhou", "sup_only", "self_only", "no_point_filtering",
                                  "same_augmentation", "no_distillation"])
def test_training_config_loads(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.train.output_dir.endswith(name)
    if name == "kitti_eigen_zhou":
        assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.milestones) == (12, 1e-4, (0.75,))
        assert cfg.model.pretrained == "file" and cfg.train.max_steps == 20 * 3318
    expected = {"sup_only": ("S",), "self_only": ("U",)}.get(name, ("S", "U"))
    assert cfg.branches == expected
