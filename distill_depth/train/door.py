"""Checked at the door: what a run needs, verified before any model is built.

Rank 0 checks, every rank hears the verdict (one broadcast), so all ranks stop together and only
rank 0 prints the one line (see :class:`RunStopped`). Checked: the train (and, when validation
runs, val) shards resolve, their manifests read and list shards of the recorded sizes (the sha256
of each shard is checked by every rank's stream), ``model.weights`` exists under
``model.pretrained: file``, ``train.output_dir`` is writable, one optimiser step's samples fit in
the training shards (``data.batch_size``), and ``train.resume`` resolves to a checkpoint that
passes its manifest check (``auto`` falls back past a failing one).
"""

from __future__ import annotations

import os
from pathlib import Path

from distill_depth.config import Config, ConfigError
from distill_depth.data.shard_reader import ShardError, resolve_shards
from distill_depth.train.checkpoint import CheckpointError, resolve_resume
from distill_depth.train.distributed import RunStopped

__all__ = ["RunStopped", "check_run"]


def check_run(cfg: Config, samples_per_step: int | None = None) -> Path | None:
    """Raise :class:`ConfigError` (naming the key and the path) for a run that cannot work;
    returns the checkpoint to resume from (None: a fresh start). ``samples_per_step``: distinct
    samples one micro-step of the whole run reads (``data.batch_size`` × U ranks per cell × cells)."""
    train_samples = _check_shards("data.train_shards", cfg.data.train_shards)
    if samples_per_step is not None and samples_per_step > train_samples:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}: one step of this run reads {samples_per_step} distinct samples, "
            f"data.train_shards={cfg.data.train_shards} holds {train_samples}, so every batch would repeat "
            "samples; lower data.batch_size or make shards from more frames")
    if cfg.data.val_shards and cfg.train.val_every:
        _check_shards("data.val_shards", cfg.data.val_shards)
    if cfg.model.pretrained == "file" and not Path(str(cfg.model.weights)).is_file():
        raise ConfigError(f"model.weights={cfg.model.weights}: no such file (model.pretrained is 'file')")
    _check_writable("train.output_dir", Path(cfg.train.output_dir))
    try:
        return resolve_resume(cfg.train.resume, cfg.train.output_dir)
    except CheckpointError as exc:
        message = str(exc)
        if not message.startswith("train.resume"):
            message = f"train.resume={cfg.train.resume}: {message}"
        raise ConfigError(message) from None


def _check_shards(key: str, spec: str) -> int:
    """The shards resolve, their manifest reads, every shard it lists is there with its recorded
    size; returns the number of samples. (Each rank's stream checks the sha256 of the shards when it opens them, all ranks at
    once: hashing every shard here would keep the other ranks waiting on rank 0.)"""
    if "{" not in spec and not os.path.exists(spec):
        raise ConfigError(f"{key}={spec}: no such file or folder")
    try:
        shards = resolve_shards(spec, verify=False)
        records = {r.get("name"): r for r in (shards.manifest or {}).get("shards", [])}
        for url in shards.urls:
            recorded = records.get(Path(url).name, {}).get("bytes")
            if recorded is not None and os.path.getsize(url) != recorded:
                raise ShardError(f"{url}: {os.path.getsize(url)} bytes, its manifest says {recorded} "
                                 "(truncated or replaced shard)")
        return sum(shards.sample_counts())
    except (ShardError, OSError) as exc:
        raise ConfigError(f"{key}={spec}: {exc}") from None


def _check_writable(key: str, folder: Path) -> None:
    probe = folder / f".write_check_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={folder}: not writable ({exc.strerror or exc})") from None
