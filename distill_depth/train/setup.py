"""What the trainer's construction is made of: the verdict at the door, the branches (each from
its own seed), DeepSpeed engines, initial weights, and the run's reporting helpers."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill_depth.checkpoint_io import init_branch_weights
from distill_depth.config import Config, ConfigError
from distill_depth.topology import Topology
from distill_depth.train.checkpoint import BranchState
from distill_depth.train.distributed import broadcast_object, gather_objects
from distill_depth.train.door import RunStopped, check_run
from distill_depth.train.optim import build_optimizer, build_scheduler
from distill_depth.train.rng import seed_everything
from distill_depth.train.signals import requeue_if_slurm
from distill_depth.train.speed import apply_speed_switches
from distill_depth.train.tracking import colorize

log = logging.getLogger("distill_depth.train")

BRANCH_SEED_OFFSET = {"S": 0, "U": 1}
"""Each branch is initialised from its own seed, so its initial weights do not depend on placement."""


def checked_at_the_door(cfg: Config, is_main: bool, samples_per_step: int | None = None) -> Path | None:
    """Rank 0 checks what the run needs (``door.check_run``) before any model is built; every
    rank gets the verdict, so all stop together (:class:`RunStopped`, exit 2) with one message.
    Returns the verified checkpoint to resume from."""
    verdict: tuple[str | None, str | None] = (None, None)
    if is_main:
        try:
            found = check_run(cfg, samples_per_step)
            verdict = (None, None if found is None else str(found))
        except ConfigError as exc:
            verdict = (str(exc), None)
    error, resume = broadcast_object(verdict)
    if error is not None:
        raise RunStopped(error, 2, report=is_main)
    return None if resume is None else Path(resume)


def build_branch_states(cfg: Config, roles: tuple[str, ...] | list[str], device: torch.device) -> dict[str, BranchState]:
    """This rank's branches with their optimiser, schedule and (fp16) grad scaler."""
    from distill_depth.branches import build_branch  # noqa: PLC0415

    branches: dict[str, BranchState] = {}
    for name in roles:
        seed_everything(cfg.train.seed + BRANCH_SEED_OFFSET[name])
        # speed switches before the optimiser (it holds the parameters) and before DDP wraps it
        model = apply_speed_switches(build_branch(name, cfg).to(device), cfg.train)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.train.max_steps, cfg.optim)
        scaler = torch.amp.GradScaler(device.type) if cfg.train.mixed_precision == "fp16" else None
        branches[name] = BranchState(name, model, optimizer, scheduler, scaler)
    return branches


def init_weights(branches: dict[str, BranchState], cfg: Config, device: torch.device, is_main: bool) -> None:
    """``train.init_s`` / ``train.init_u``: a fresh run starts from another run's weights."""
    for name, state in branches.items():
        source = {"S": cfg.train.init_s, "U": cfg.train.init_u}[name]
        if source:
            path = init_branch_weights(state.model, name, source, device)
            if is_main:
                log.info("branch %s starts from %s", name, path)


def attach_deepspeed(branches: dict[str, BranchState], topology: Topology, cfg: Config, micro_batch: int) -> None:
    """Give each local branch a DeepSpeed engine over its own group (after its initial weights:
    ZeRO copies the parameters into its flat fp32 partitions here)."""
    from distill_depth.train.deepspeed import (  # noqa: PLC0415
        GroupMPU, build_engine, deepspeed_config, ensure_process_group, single_rank_groups,
    )

    ensure_process_group(topology.device)
    self_groups = single_rank_groups(topology.layout.world)
    for name, state in branches.items():
        config = deepspeed_config(cfg, micro_batch, topology.group_size(name))
        group = topology.groups.get(name) or torch.distributed.group.WORLD  # one process: no branch group
        mpu = GroupMPU(group, topology.layout.group_ranks[name], self_groups[topology.rank], topology.rank)
        state.engine, state.optimizer, state.scheduler = build_engine(
            state.model, state.optimizer, state.scheduler, config, mpu
        )


def stop_before_first_step(step: int, is_main: bool) -> None:
    """A stop signal arrived during start-up (all ranks agreed before doing any step).

    No step was done in this process, so there is nothing new to save: the run folder's newest
    complete checkpoint (if any) is exactly where a restart continues. Exit 0 (and requeue under
    SLURM) without spending the grace period on a step and a checkpoint.
    """
    if is_main:
        log.warning("stopped by signal before the first step (at step %d); nothing new to checkpoint", step)
        requeue_if_slurm()


def reduce_scalars(totals: dict[str, list[float]], is_main: bool) -> dict[str, float]:
    """Means over this rank's steps, then over the ranks reporting each key (collective)."""
    local = {k: float(np.mean(v)) for k, v in totals.items() if v}
    merged: dict[str, list[float]] = defaultdict(list)
    for rank_values in gather_objects(local):
        for key, value in rank_values.items():
            merged[key].append(value)
    if not is_main:
        return {}
    # Timings are a rank's wall clock: the slowest rank is what the step costs.
    return {k: (max(v) if k.endswith("_s") else float(np.mean(v))) for k, v in merged.items()}


def log_images(predictions: dict[str, Any], topology: Topology, tracker: Any, step: int) -> None:
    """Depth and confidence of each group leader's last prediction (collective)."""
    images = {}
    for name, pred in predictions.items():
        if topology.is_group_leader(name):
            depth, confidence = colorize(pred.canonical_depth.detach(), pred.canonical_confidence.detach())
            images[f"images/{name}/depth"], images[f"images/{name}/confidence"] = depth, confidence
    merged: dict[str, Any] = {}
    for rank_images in gather_objects(images):
        merged.update(rank_images)
    if merged:
        tracker.log_images(merged, step)


def append_jsonl(path: Path, step: int, values: dict[str, float]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, **values}) + "\n")


def progress_bar(enabled: bool, initial: int, total: int) -> Any:
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
