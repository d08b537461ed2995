"""The fidelity benchmark's plan: which runs, drives, steps and seeds, and which single-branch
stage-1 trainings each run starts from (``benchmarks/fidelity.py`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fidelity_report import BASELINES, label

REPO = Path(__file__).resolve().parent.parent

RUNS = ("sup_only", "self_only", "mutual", "no_point_filtering", "same_augmentation", "one_way", "no_distillation")
ABLATIONS = RUNS[3:-1]
"""``--runs`` adds them; the default plan (3 seeds × 3 label fractions) leaves them out to stay under an hour."""
"""``no_distillation`` is left out by default: with per-branch random streams its S equals
``sup_only``'s and its U equals ``self_only``'s exactly (it only re-checks that)."""
QUICK_RUNS = ("sup_only", "self_only", "mutual")
BRANCHES = {"sup_only": "S", "self_only": "U", **{run: "SU" for run in RUNS if run not in ("sup_only", "self_only")}}
"""The branches each run trains."""
LABEL_FREE_RUNS = ("self_only",)
"""Runs without branch S: the labelled fraction changes nothing in them, so a sweep runs them once
(unless the overrides make U read labels: :func:`u_reads_labels`)."""


def u_reads_labels(overrides: tuple[str, ...] | list[str]) -> bool:
    """Whether branch U trains on LiDAR under these overrides (``loss.u_confidence_target=lidar``:
    its shown confidence learns from the labelled images). Then U-only runs and U's stage 1 follow
    the label fraction like S's, so no U sees the LiDAR of an image outside the labelled subset."""
    from distill_depth.config import load_config

    cfg = load_config(REPO / "configs" / "bench_self_only.yaml", list(overrides))
    return cfg.loss.u_confidence_target == "lidar"


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    beams: int
    """LiDAR beams of the synthetic sensor (``distill-depth synth --beams``)."""
    train_drives: int
    train_frames: int
    test_drives: int
    test_frames: int
    steps: int
    batch_size: int
    first_stage_steps: int = 0
    """``--two-stage N``: S-only and U-only train N steps first; every run then continues ``steps``
    more from those weights (alone, or mutually), so "distillation from a noisy partner early on"
    is separated from "distillation itself"."""
    second_stage_lr_factor: float = 0.1
    """``--stage2-lr-factor F``: stage 2 of ``--two-stage`` trains at F × the configured learning
    rates (``optim.schedule: step`` with a milestone at step 0), so that 300 + 100 steps are one
    step-decayed schedule of 400, the shape of the KITTI recipe's (``optim.milestones: [0.75]``,
    × 0.1). 1 = the stage-1 rates again (the plan until 2026-12-06): each run's fresh Adam then
    restarts at the full rate, and any change to a loss moved a 100-step U by ±20 %."""
    failures: bool = True
    """Synthetic failure modes (moving cars, LiDAR dropout and noise, textureless patches) in train
    and test drives, and per-region evaluation (``evaluate --regions``)."""
    train_seed: int = 1000
    """``synth --seed`` of the training drives."""
    test_seed: int = 2000
    """``synth --seed`` of the held-out test drives. Settings are chosen on other seeds (``--data-seeds``,
    e.g. 1100,3000: a tuning split) and only then measured here, so the test drives never pick a setting."""


# 22 beams over the HDL-64E's field of view: at 64 rows, one beam every ~2.8 rows, the density
# KITTI's 64 beams have at the standard 640x192 (64 beams at 64 rows would cover every row).
# Two stages by default: from step 0 each branch spends its steps learning the other's early noise
# (160 steps from scratch: mutual S +6.8 % at fraction 1, docs/fidelity.md); distillation between
# partners trained alone first is the paper's claim that this budget can test. ``--two-stage 0
# --steps 160`` is the from-scratch plan.
FULL = Plan(height=64, width=192, beams=22, train_drives=8, train_frames=50, test_drives=2, test_frames=24,
            steps=100, batch_size=4, first_stage_steps=300)
FULL_SEEDS, FULL_FRACTIONS = "0,1,2", "1,0.25,0.05"
FAILURE_FLAGS = ("--moving-objects", "3", "--lidar-dropout", "--lidar-noise", "0.03", "--textureless")
"""What ``--failures`` passes to ``distill-depth synth``: the failures each branch has and the other may repair."""
QUICK = Plan(height=64, width=192, beams=22, train_drives=3, train_frames=30, test_drives=1, test_frames=24,
             steps=80, batch_size=4)
QUICK_SEEDS, QUICK_FRACTIONS = "0", "1,0.25"


def run_dir(work: Path, run: str, fraction: float, seed: int, stage: int = 2) -> Path:
    """A run's folder: ``runs/mutual_f0.25_seed1``; stage-1 runs of ``--two-stage`` get ``stage1_``."""
    return work / "runs" / (("stage1_" if stage == 1 else "") + label(run, fraction).replace("@", "_f") + f"_seed{seed}")


def stage_one_sources(run: str, fraction: float, seed: int, work: Path, overrides: tuple[str, ...]) -> dict[str, Path]:
    """Branch → the stage-1 run its stage 2 starts from: S-only at the run's fraction; U-only at
    fraction 1, or at the run's fraction when U reads labels (:func:`u_reads_labels`)."""
    u_fraction = fraction if u_reads_labels(overrides) else 1.0
    return {branch: run_dir(work, BASELINES[branch], f, seed, stage=1)
            for branch, f in (("S", fraction), ("U", u_fraction)) if branch in BRANCHES[run]}


def plan_jobs(runs: tuple[str, ...], fractions: tuple[float, ...], seeds: tuple[int, ...],
              overrides: tuple[str, ...], two_stage: bool) -> tuple[dict[str, tuple[str, float]], list]:
    """(labels, stage-1 jobs): every result label → (run, fraction), and the (run, fraction, seed)
    single-branch trainings of stage 1 (none without ``two_stage``). U alone never sees labels, so
    it runs once, at fraction 1, whatever the sweep; when the overrides make U read labels
    (:func:`u_reads_labels`) it runs at every fraction, like S."""
    u_reads = u_reads_labels(overrides)
    label_free = () if u_reads else LABEL_FREE_RUNS
    labels = {label(run, f): (run, f) for f in fractions for run in runs if not (run in label_free and f < 1.0)}
    labels.update({run: (run, 1.0) for run in runs if run in label_free})
    first = []
    if two_stage:
        first = sorted({(BASELINES[b], f, seed) for (run, fraction) in labels.values() for seed in seeds
                        for b, f in (("S", fraction), ("U", fraction if u_reads else 1.0)) if b in BRANCHES[run]})
    return labels, first
