"""Step-numbered, atomic checkpoints of both branches; resume; final export; ``load_branches``.

Layout of ``{output_dir}/checkpoints/step_{N:08d}/``::

    S/model.safetensors  S/optimizer.pt  S/scheduler.pt  [S/scaler.pt]   (S group's first rank)
    U/...                                                                 (U group's first rank)
    {S,U}/deepspeed/state/  under ``train.deepspeed``, instead of optimizer/scheduler: every rank of
                            the group its ZeRO shard, the first rank the engine's model states
    rng/rank_{r:05d}.pt     torch / cuda / numpy / python RNG of every rank + its branches' streams
    state.json              step, data position (epoch, batch in epoch), placement
    config.yaml             the resolved config
    manifest.json           size and sha256 of every file above (and of DeepSpeed's shards)
    COMPLETE                written last; names the sha256 of manifest.json

Everything is written into ``.tmp_step_{N:08d}/`` and renamed when complete, so a folder named
``step_*`` with a ``COMPLETE`` marker is never partial. The run folder must be on a file system
that every rank sees (one node, or a shared file system across nodes).

Checkpoints verify themselves: each rank hashes the files it wrote right after writing them (they
are still in the page cache), rank 0 gathers the records into ``manifest.json`` before writing
``COMPLETE``. ``resolve_resume`` (``train.resume=auto``) checks the newest complete checkpoint and
falls back to the next older one on a mismatch or an unreadable file, naming the file;
``load_branches`` (``evaluate``, ``predict``) checks the files it reads. A checkpoint written
before manifests existed (no ``manifest.json``) still loads, unchecked. Every ``.pt`` file loads
with ``torch.load(weights_only=True)`` (tensors, numbers, strings, containers; for the RNG files
of those older checkpoints also exactly numpy's array types): a file carrying any other pickled
object is refused with :class:`CheckpointCorrupt` and nothing in it runs (DeepSpeed's files too:
``deepspeed.load_safely`` gives the engines this loader, ``load_plain``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The reading side (layout constants, manifest checks, load_branches) is shared with evaluation
# and prediction, which must not import the trainer; re-exported here for older imports.
from distill_depth.checkpoint_io import (
    MANIFEST,
    MARKER,
    STEP_DIR,
    CheckpointCorrupt,
    CheckpointError,
    complete_checkpoints,
    device_name,
    first_line,
    load_branches,
    load_weights,
    verify_checkpoint,
)
from distill_depth.config import Config, save_config
from distill_depth.train.distributed import RunStopped, barrier, gather_objects
from distill_depth.train.file_writing import (
    WRITE_ERRORS,
    Writing,
    file_record,
    save_weights,
    write_manifest,
)
from distill_depth.train.rng import BranchStreams, rng_state, set_rng_state

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
    writing = Writing(tmp)
    records: dict[str, dict[str, Any]] = {}
    try:
        records = _write_rank_files(tmp, branches, leaders, rank, streams, writing)
    except WRITE_ERRORS as exc:
        writing.fail(exc)
    gathered = gather_objects((records, writing.error))  # collective: every rank has written its files
    errors = [error for _, error in gathered if error]
    if rank == 0 and not errors:
        try:
            _complete(tmp, final, step, position, world, cfg, placement, gathered, writing)
        except WRITE_ERRORS as exc:
            writing.fail(exc)
            errors.append(writing.error)
    errors = gather_objects(errors)[0]  # rank 0's verdict: everyone's errors and its own
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = [p for p in complete_checkpoints(output_dir) if p != final]
        raise RunStopped(f"checkpoint of step {step} not written: {errors[0]}; nothing of it is counted as "
                         f"complete; the newest complete checkpoint is {kept[-1] if kept else 'none (no checkpoint yet)'}",
                         1, report=rank == 0)
    if rank == 0:
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_rank_files(tmp: Path, branches: list[BranchState], leaders: set[str], rank: int,
                      streams: BranchStreams | None, writing: Writing) -> dict[str, dict[str, Any]]:
    """This rank's files: its branches' weights and optimiser state (group leaders), DeepSpeed
    shards, its RNG state; returns their records (hashed right after writing: from the page cache)."""
    written: list[str] = []
    for branch in branches:
        if branch.name not in leaders:
            continue
        folder = tmp / branch.name
        folder.mkdir(exist_ok=True)
        save_weights(branch.model, writing.at(folder / "model.safetensors"))
        written.append(f"{branch.name}/model.safetensors")
        for filename, payload in branch.state_files().items():
            torch.save(payload, writing.at(folder / filename))
            written.append(f"{branch.name}/{filename}")
    for branch in branches:
        if branch.engine is not None:  # every rank of the group writes its ZeRO shard
            branch.engine.save_checkpoint(str(writing.at(tmp / branch.name / "deepspeed")), tag="state")
    rng = rng_state()
    if streams is not None:
        rng["branches"] = streams.state_dict()
    torch.save(rng, writing.at(tmp / "rng" / f"rank_{rank:05d}.pt"))
    written.append(f"rng/rank_{rank:05d}.pt")
    return {name: file_record(tmp / name) for name in written}


def _complete(tmp: Path, final: Path, step: int, position: DataPosition, world: int, cfg: Config,
              placement: dict[str, Any], gathered: list[Any], writing: Writing) -> None:
    """Rank 0: state, config, manifest, then ``COMPLETE`` and the rename that makes it count."""
    files = {name: record for part, _ in gathered for name, record in part.items()}
    state = {"step": step, "epoch": position.epoch, "batch_in_epoch": position.batch_in_epoch,
             "world": world, **placement}
    writing.at(tmp / "state.json").write_text(json.dumps(state, indent=2))
    save_config(cfg, writing.at(tmp / "config.yaml"))
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):  # state, config, DeepSpeed's shards
        files.setdefault(file.relative_to(tmp).as_posix(), file_record(file))
    digest = write_manifest(writing.at(tmp), files)
    writing.at(tmp / MARKER).write_text(f"step {step}\nmanifest sha256 {digest}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The verified checkpoint to resume from (see the module docstring).

    ``auto``: the newest complete checkpoint in ``output_dir`` that passes its check (each one that
    fails is logged, naming the file, and the next older one is tried); none when there is none,
    an error when every one fails. ``none``: none. A path (a checkpoint, or a run folder: its
    newest complete checkpoint): it, or an error naming what is wrong with it.
    """
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        for candidate in reversed(found):
            try:
                verify_checkpoint(candidate)
                return candidate
            except CheckpointCorrupt as exc:
                log.warning("%s: skipping checkpoint %s, trying the previous complete one", exc, candidate.name)
        if found:
            raise CheckpointCorrupt(f"train.resume=auto: all {len(found)} complete checkpoint(s) in "
                                    f"{Path(output_dir) / 'checkpoints'} fail their check (see the log); "
                                    "train.resume=none starts afresh")
        return None
    path = Path(resume)
    if (path / MARKER).is_file():
        target = path
    else:
        found = complete_checkpoints(path)
        if not found:
            what = ("does not exist" if not path.exists()
                    else f"is no checkpoint (no {MARKER} marker, no complete checkpoint under it)")
            raise CheckpointError(f"train.resume={resume}: {what}")
        target = found[-1]
    try:
        verify_checkpoint(target)
    except CheckpointCorrupt as exc:
        raise CheckpointCorrupt(f"train.resume={resume}: {exc}") from None
    return target


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
        engine_state = folder / "deepspeed" / "state"
        if (branch.engine is not None) != engine_state.is_dir():
            written = "with" if engine_state.is_dir() else "without"
            raise CheckpointError(f"checkpoint {path}: branch {branch.name} was saved {written} a DeepSpeed engine "
                                  f"({engine_state}); resume it with the train.deepspeed it was written with")
        if branch.engine is not None:  # weights, this rank's ZeRO shard, the schedule
            branch.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_lr_scheduler_states=True)
            continue
        load_weights(branch.model, folder / "model.safetensors", device)
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


def _numpy_array_types() -> list[Any]:
    """The numpy globals that the RNG files of checkpoints before manifests pickled (their numpy
    generator state): arrays of a plain dtype, nothing that runs code."""
    import numpy as np  # noqa: PLC0415

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [np.ndarray, np.dtype, multiarray._reconstruct, type(np.dtype(np.uint32))]


def _load(path: Path, device: torch.device) -> Any:
    """``torch.load(weights_only=True)``: optimiser/scheduler/scaler state, RNG state."""
    return load_plain(path, device)


def load_plain(path: Path | str, map_location: Any, allowed: tuple[Any, ...] = ()) -> Any:
    """``torch.load(weights_only=True)`` allowing numpy's array types and the classes ``allowed``
    (plain data, nothing that runs code); a file with any other pickled object is
    :class:`CheckpointCorrupt`, and nothing in it runs."""
    try:
        with torch.serialization.safe_globals([*_numpy_array_types(), *allowed]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointCorrupt(f"checkpoint file {path}: refused: it holds a pickled object{what} that is not "
                                "plain data, and loading it could run code; nothing of it was run") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointCorrupt(f"checkpoint file {path}: unreadable ({first_line(exc)})") from None


def export_run(output_dir: str | Path, models: dict[str, nn.Module], cfg: Config, step: int,
               rank: int, checkpoint: Path | None) -> Path:
    """Collective: the final export (:func:`export_branches` by each group leader, passed as
    ``models``; the metadata by rank 0). A write that fails on any rank stops every rank together
    (:class:`RunStopped`, exit 1) naming the file; the newest checkpoint still holds the weights."""
    folder = Path(output_dir) / "export"
    writing = Writing(folder)
    try:
        if models:
            export_branches(output_dir, models, writing)
    except WRITE_ERRORS as exc:
        writing.fail(exc)
    errors = [error for error in gather_objects(writing.error) if error]
    if rank == 0 and not errors:
        try:
            write_export_meta(output_dir, cfg, step, writing)
        except WRITE_ERRORS as exc:
            writing.fail(exc)
            errors.append(writing.error)
    errors = gather_objects(errors)[0]
    if errors:
        raise RunStopped(f"final export of step {step} not written: {errors[0]}; the weights of that step are in "
                         f"the checkpoint {checkpoint}", 1, report=rank == 0)
    return folder


def export_branches(output_dir: str | Path, models: dict[str, nn.Module], writing: Writing | None = None) -> Path:
    """``{output_dir}/export/{S,U}.safetensors`` (call on one rank per branch); each file appears
    under its name only once complete."""
    folder = Path(output_dir) / "export"
    writing = writing or Writing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        tmp = writing.at(folder / f".{name}.safetensors.tmp")
        try:
            save_weights(model, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half file would fill what is left of the disk
            raise
        os.replace(tmp, folder / f"{name}.safetensors")
    return folder


def write_export_meta(output_dir: str | Path, cfg: Config, step: int, writing: Writing | None = None) -> None:
    folder = Path(output_dir) / "export"
    writing = writing or Writing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, writing.at(folder / "config.yaml"))
    writing.at(folder / "state.json").write_text(json.dumps({"step": step}))
    write_manifest(writing.at(folder), {p.name: file_record(p) for p in sorted(folder.iterdir())
                                        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")})
