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


@pytest.mark.slow
def test_multinode_config_as_two_machines_on_this_host(reference_run, tiny_shards: Path, tmp_path: Path) -> None:
    """``launch/accelerate/multinode.yaml`` on two "machines" (two launchers, machine_rank 0 and 1,
    127.0.0.1, one process each): S trains on machine 0, U on machine 1, they exchange every step
    and the export equals the single-launcher 2-process run's (``reference_run``) bit for bit."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from train_procs import REFERENCE_STEPS, REPO, child_env, free_port, tiny_overrides

    out, port = tmp_path / "run", str(free_port())
    launchers = []
    for machine in (0, 1):
        log = (tmp_path / f"machine{machine}.log").open("w")
        launchers.append(subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(REPO / "launch/accelerate/multinode.yaml"), "--num_processes", "2", "--machine_rank", str(machine),
             "--main_process_ip", "127.0.0.1", "--main_process_port", port, "train.py",
             *tiny_overrides(tiny_shards, out, REFERENCE_STEPS, "train.report_to=none")],
            cwd=REPO, env=child_env(ACCELERATE_USE_CPU="1"), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [launcher.wait(timeout=240) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    logs = [(tmp_path / f"machine{m}.log").read_text() for m in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "groups {'S': (0,), 'U': (1,)}" in logs[0] and "training done at step" in logs[0]
    assert reference_run.codes == [0], reference_run.run.tail()
    for name in ("S", "U"):
        a = load_file(reference_run.run.out / "export" / f"{name}.safetensors")
        b = load_file(out / "export" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
