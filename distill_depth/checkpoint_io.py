"""Reading trained branches back from a run, checkpoint or export folder (``load_branches``).

The read side of the run folder layout written by ``distill_depth.train.checkpoint``. It lives
outside ``distill_depth.train`` so that evaluation and prediction load weights without importing
the trainer (its distributed start, RNG streams and optimisers); the trainer imports the layout
constants from here, so writer and reader cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model
from torch import nn

from distill_depth.config import Config, config_from_dict
from distill_depth.data.shard_reader import sha256_file

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
"""Written last into a checkpoint folder: a ``step_*`` folder without it is never read."""
MANIFEST = "manifest.json"
"""Size and sha256 of every file of a checkpoint or export folder, written before ``COMPLETE``."""
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint/export path that does not hold what was asked for."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file that fails its manifest check, cannot be read, or holds pickled code;
    the message names the file."""


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def device_name(device: torch.device) -> str:
    """safetensors wants ``cpu`` (not ``cpu:0``, which accelerate's CPU ranks report) or ``cuda:N``."""
    return "cpu" if device.type == "cpu" else str(device)


def verify_checkpoint(path: Path, only: list[str] | None = None) -> bool:
    """Check the files of checkpoint/export folder ``path`` (or just ``only``, relative names)
    against its manifest. True when checked; False for a folder without a manifest (written before
    manifests existed: loads unchecked). Raises :class:`CheckpointCorrupt` naming the first file
    that is missing, has another size or sha256, or cannot be read."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        log.info("checkpoint %s has no %s (written by an older version): its files are not checked", path, MANIFEST)
        return False
    try:
        text = manifest_file.read_text()
        files = json.loads(text)["files"]
        marker = (path / MARKER).read_text() if (path / MARKER).is_file() else ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorrupt(f"checkpoint file {manifest_file}: unreadable ({exc})") from None
    recorded = re.search(r"manifest sha256 ([0-9a-f]{64})", marker)
    if recorded and hashlib.sha256(text.encode()).hexdigest() != recorded.group(1):
        raise CheckpointCorrupt(f"checkpoint file {manifest_file}: sha256 differs from the one {MARKER} records "
                                "(corrupt or replaced)")
    for name in files if only is None else [n for n in only if n in files]:
        _check_file(path / name, files[name])
    return True


def _check_file(file: Path, record: dict[str, Any]) -> None:
    try:
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointCorrupt(f"checkpoint file {file}: {size} bytes, {MANIFEST} says {record['bytes']} "
                                    "(truncated or replaced)")
        if sha256_file(file) != record["sha256"]:
            raise CheckpointCorrupt(f"checkpoint file {file}: sha256 does not match {MANIFEST} (corrupt or replaced)")
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint file {file}: missing (listed in {MANIFEST})") from None
    except OSError as exc:
        raise CheckpointCorrupt(f"checkpoint file {file}: unreadable ({exc.strerror or exc})") from None


def _unreadable(file: Path, exc: BaseException) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"checkpoint file {file}: unreadable ({first_line(exc)})")


def load_weights(model: nn.Module, file: Path, device: torch.device) -> None:
    """safetensors weights into ``model`` (strict); an unreadable file is :class:`CheckpointCorrupt`."""
    try:
        load_model(model, str(file), strict=True, device=device_name(device))
    except (SafetensorError, OSError) as exc:
        raise _unreadable(file, exc) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _weights_location(path: Path) -> tuple[Path, dict[str, Path]]:
    """(config file, {branch: safetensors file}) for a run / checkpoint / export folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"load_branches: {path} does not exist")
    if (path / MARKER).is_file():
        return path / "config.yaml", {n: path / n / "model.safetensors" for n in ("S", "U")}
    if (path / "config.yaml").is_file() and any(path.glob("*.safetensors")):
        return path / "config.yaml", {n: path / f"{n}.safetensors" for n in ("S", "U")}
    candidates: list[tuple[int, Path]] = []
    export = path / "export"
    if (export / "config.yaml").is_file():
        meta = export / "state.json"
        step = json.loads(meta.read_text())["step"] if meta.is_file() else -1
        candidates.append((step, export))
    found = complete_checkpoints(path)
    if found:
        candidates.append((int(STEP_DIR.match(found[-1].name).group(1)), found[-1]))  # type: ignore[union-attr]
    if not candidates:
        raise CheckpointError(f"load_branches: {path} is no run, checkpoint or export folder")
    # The newer wins; on a tie the export (the final weights of the run).
    _, best = max(candidates, key=lambda c: (c[0], c[1].name == "export"))
    return _weights_location(best)


def init_branch_weights(model: nn.Module, name: str, path: str | Path, device: torch.device) -> Path:
    """Load branch ``name``'s trained weights from a run / checkpoint / export folder into
    ``model`` (``train.init_s`` / ``train.init_u``). Strict on the weights, so a branch built with
    other settings is an error naming the file; the branch's run state (``run_state_keys``, e.g. S's
    running partner trust) is not carried over: the new run starts it afresh, whether or not the
    source run had it. Returns the file read."""
    config_file, files = _weights_location(Path(path))
    if not files[name].is_file():
        raise CheckpointError(f"train.init_{name.lower()}: no weights for branch {name} at {files[name]}")
    folder = config_file.parent
    verify_checkpoint(folder, only=[files[name].relative_to(folder).as_posix()])
    run_state = set(getattr(model, "run_state_keys", ()))
    try:
        stored = load_file(str(files[name]), device=device_name(device))
        weights = {k: v for k, v in stored.items() if k not in run_state}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(files[name], exc) from None
    misfit = f"train.init_{name.lower()}: {files[name]} does not fit branch {name} as configured"
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise CheckpointError(f"{misfit} ({first_line(exc)})") from None
    missing = sorted(set(result.missing_keys) - run_state)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{misfit} (missing: {missing[:5]}, unexpected: {sorted(result.unexpected_keys)[:5]})")
    return files[name]


def load_branches(path: str | Path, names: tuple[str, ...] = ("S", "U"), device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, nn.Module], Config]:
    """Branches with trained weights, in eval mode, and the run's config.

    ``path``: a run folder (the newer of its export and its newest complete checkpoint), a
    checkpoint folder (``.../checkpoints/step_N``) or an export folder.
    """
    from distill_depth.branches import build_branch  # the networks (timm) only when weights are read

    config_file, files = _weights_location(Path(path))
    folder = config_file.parent
    verify_checkpoint(folder, only=[config_file.name] + [files[n].relative_to(folder).as_posix() for n in names])
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    models: dict[str, nn.Module] = {}
    for name in names:
        if not files[name].is_file():
            raise CheckpointError(f"load_branches: no weights for branch {name} at {files[name]}")
        # The trained weights replace any initialisation: never read ImageNet files here.
        build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="none"))
        model = build_branch(name, build_cfg)
        load_weights(model, files[name], torch.device(device))
        models[name] = model.to(device).eval()
    return models, cfg


def load_branches_for_command(command: str, path: str | Path, names: tuple[str, ...], device: torch.device
                              ) -> tuple[dict[str, nn.Module], Config] | tuple[None, None]:
    """:func:`load_branches` for a ``distill-depth COMMAND``: on a bad path or weights that do not
    fit this code's networks, one error line on stderr naming the path, and ``(None, None)``."""
    try:
        return load_branches(path, names=names, device=device)
    except (ValueError, OSError) as exc:
        print(f"distill-depth {command}: error: {exc}", file=sys.stderr)
    except RuntimeError as exc:  # weights that do not fit the network this code builds
        print(f"distill-depth {command}: error: {path}: the saved weights do not fit the networks "
              f"of this version of the code ({first_line(exc)})", file=sys.stderr)
    return None, None
