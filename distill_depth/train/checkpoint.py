"""Step-numbered, atomic checkpoints of both branches; resume; final export.

``load_branches`` (reading a run back) lives in ``distill_depth.checkpoint_io`` and is re-exported.

Layout of ``{output_dir}/checkpoints/step_{N:08d}/``::

    S/model.safetensors  S/optimizer.pt  S/scheduler.pt  [S/scaler.pt]   (S group's first rank)
    U/...                                                                 (U group's first rank)
    rng/rank_{r:05d}.pt     torch / cuda / numpy / python RNG of every rank + its branches' streams
    state.json              step, data position (epoch, batch in epoch), placement
    config.yaml             the resolved config
    COMPLETE                written last

Everything is written into ``.tmp_step_{N:08d}/`` and renamed when complete, so a folder named
``step_*`` with a ``COMPLETE`` marker is never partial. The run folder must be on a file system
that every rank sees (one node, or a shared file system across nodes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

# The reading side (and the layout constants) is shared with evaluation and prediction, which
# must not import the trainer; re-exported here for code that imported it from this module.
from distill_depth.checkpoint_io import (
    MARKER,
    STEP_DIR,
    CheckpointError,
    complete_checkpoints,
    device_name,
    load_branches,
)
from distill_depth.config import Config, save_config
from distill_depth.train.distributed import barrier
from distill_depth.train.rng import BranchStreams, rng_state, set_rng_state

__all__ = [
    "MARKER", "STEP_DIR", "BranchState", "CheckpointError", "DataPosition", "checkpoint_dir",
    "complete_checkpoints", "export_branches", "load_branches", "load_checkpoint", "resolve_resume",
    "save_checkpoint", "write_export_meta",
]

log = logging.getLogger(__name__)

@dataclass
class DataPosition:
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of ``epoch`` already consumed."""


@dataclass
class BranchState:
    """What one branch owns on this rank: the module (unwrapped) and its optimisation state."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any | None = None
    engine: Any | None = None
    """DeepSpeed engine (``train.deepspeed``): it owns the sharded optimiser state and saves it."""

    def state_files(self) -> dict[str, Any]:
        if self.engine is not None:
            return {}
        files = {"optimizer.pt": self.optimizer.state_dict(), "scheduler.pt": self.scheduler.state_dict()}
        if self.scaler is not None:
            files["scaler.pt"] = self.scaler.state_dict()
        return files


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    position: DataPosition,
    branches: list[BranchState],
    leaders: set[str],
    rank: int,
    world: int,
    cfg: Config,
    placement: dict[str, Any],
    keep_last: int,
    streams: BranchStreams | None = None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final folder.

    ``streams``: the per-branch random streams of this rank, saved beside its global RNG state.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    for branch in branches:
        if branch.name not in leaders:
            continue
        folder = tmp / branch.name
        folder.mkdir(exist_ok=True)
        save_model(branch.model, str(folder / "model.safetensors"))
        for filename, payload in branch.state_files().items():
            torch.save(payload, folder / filename)
    for branch in branches:
        if branch.engine is not None:  # every rank of the group writes its ZeRO shard
            branch.engine.save_checkpoint(str(tmp / branch.name / "deepspeed"), tag="state")
    rng = rng_state()
    if streams is not None:
        rng["branches"] = streams.state_dict()
    torch.save(rng, tmp / "rng" / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        state = {"step": step, "epoch": position.epoch, "batch_in_epoch": position.batch_in_epoch,
                 "world": world, **placement}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        save_config(cfg, tmp / "config.yaml")
        (tmp / MARKER).write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` → newest complete one (or none), ``none``, a path."""
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"train.resume={resume!r}: no complete checkpoint there (missing {MARKER})")
    return found[-1]


def load_checkpoint(
    path: Path, branches: list[BranchState], rank: int, device: torch.device, streams: BranchStreams | None = None
) -> tuple[int, DataPosition]:
    """Restore this rank's branches, optimisers and RNG (global, and ``streams`` when given);
    returns (step, data position)."""
    state = json.loads((path / "state.json").read_text())
    for branch in branches:
        folder = path / branch.name
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"checkpoint {path} has no branch {branch.name} ({folder}/model.safetensors)")
        if branch.engine is not None:
            branch.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_lr_scheduler_states=True)
            continue
        load_model(branch.model, str(folder / "model.safetensors"), strict=True, device=device_name(device))
        branch.optimizer.load_state_dict(_load(folder / "optimizer.pt", device))
        branch.scheduler.load_state_dict(_load(folder / "scheduler.pt", device))
        if branch.scaler is not None and (folder / "scaler.pt").is_file():
            branch.scaler.load_state_dict(_load(folder / "scaler.pt", device))
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file() and state.get("world") is not None:
        saved = _load(rng_file, torch.device("cpu"))
        set_rng_state(saved)
        if streams is not None:
            try:
                streams.load_state_dict(saved.get("branches", {}))
            except KeyError as exc:
                log.warning("checkpoint %s: %s for rank %d: those branches restart their stream", path, exc.args[0], rank)
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (world changed?): RNG not restored", path, rank)
    return int(state["step"]), DataPosition(int(state["epoch"]), int(state["batch_in_epoch"]))


def _load(path: Path, device: torch.device) -> Any:
    # Our own files (optimiser state, numpy RNG tuples): not restricted to weights.
    return torch.load(path, map_location=device, weights_only=False)


def export_branches(output_dir: str | Path, models: dict[str, nn.Module]) -> Path:
    """``{output_dir}/export/{S,U}.safetensors`` + ``config.yaml`` (call on one rank per branch)."""
    folder = Path(output_dir) / "export"
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        tmp = folder / f".{name}.safetensors.tmp"
        save_model(model, str(tmp))
        os.replace(tmp, folder / f"{name}.safetensors")
    return folder


def write_export_meta(output_dir: str | Path, cfg: Config, step: int) -> None:
    folder = Path(output_dir) / "export"
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    (folder / "state.json").write_text(json.dumps({"step": step}))
