"""Reading trained branches back from a run, checkpoint or export folder (``load_branches``).

The read side of the run folder layout written by ``distill_depth.train.checkpoint``. It lives
outside ``distill_depth.train`` so that evaluation and prediction load weights without importing
the trainer (its distributed start, RNG streams and optimisers); the trainer imports the layout
constants from here, so writer and reader cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model
from torch import nn

from distill_depth.config import Config, config_from_dict

MARKER = "COMPLETE"
"""Written last into a checkpoint folder: a ``step_*`` folder without it is never read."""
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint/export path that does not hold what was asked for."""


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
    ``model`` (``train.init_s`` / ``train.init_u``); strict, so a branch built with other
    settings is an error naming the file. Returns the file read."""
    _, files = _weights_location(Path(path))
    if not files[name].is_file():
        raise CheckpointError(f"train.init_{name.lower()}: no weights for branch {name} at {files[name]}")
    load_model(model, str(files[name]), strict=True, device=device_name(device))
    return files[name]


def load_branches(path: str | Path, names: tuple[str, ...] = ("S", "U"), device: str | torch.device = "cpu"
                  ) -> tuple[dict[str, nn.Module], Config]:
    """Branches with trained weights, in eval mode, and the run's config.

    ``path``: a run folder (the newer of its export and its newest complete checkpoint), a
    checkpoint folder (``.../checkpoints/step_N``) or an export folder.
    """
    from distill_depth.branches import build_branch  # the networks (timm) only when weights are read

    config_file, files = _weights_location(Path(path))
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    models: dict[str, nn.Module] = {}
    for name in names:
        if not files[name].is_file():
            raise CheckpointError(f"load_branches: no weights for branch {name} at {files[name]}")
        # The trained weights replace any initialisation: never read ImageNet files here.
        build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="none"))
        model = build_branch(name, build_cfg)
        load_model(model, str(files[name]), strict=True, device=device_name(torch.device(device)))
        models[name] = model.to(device).eval()
    return models, cfg
