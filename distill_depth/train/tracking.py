"""Experiment tracking on global rank 0: W&B, TensorBoard, or nothing.

Every rank's scalars are gathered to rank 0 by the loop (replicas of a branch are averaged),
so exactly one process talks to the tracker and a run has one timeline for both branches.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class TrackerError(ValueError):
    """A tracker that cannot be used here (e.g. tensorboard not installed)."""


def stable_run_id(output_dir: str | Path, run_name: str | None = None) -> str:
    """Tracker id derived from the run folder: the same command (same folder) resumes the same run."""
    folder = Path(output_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name or folder.name).strip("-")[:48] or "run"
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


class Tracker:
    """No-op tracker (``train.report_to: none``) and the interface of the real ones."""

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """``images``: name → ``(H, W, 3)`` uint8."""

    def log_export(self, folder: Path, step: int) -> None:
        """The run's final export folder (S, U, config), where the tracker keeps models."""

    def finish(self) -> None: ...


class WandbTracker(Tracker):
    def __init__(self, output_dir: Path, config: dict[str, Any], project: str, run_name: str | None) -> None:
        import wandb  # noqa: PLC0415 (only when asked for)

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name or Path(output_dir).resolve().name,
            id=stable_run_id(output_dir, run_name),
            resume="allow",
            dir=str(output_dir),
            config=config,
        )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        self.run.log({name: self._wandb.Image(array) for name, array in images.items()}, step=step)

    def log_export(self, folder: Path, step: int) -> None:
        """A W&B model artifact ``export-<run id>`` (aliases ``final``, ``step-N``). ``immutable``:
        W&B reads the files where they lie instead of copying both networks into its staging area
        (the export folder is not written again by this run)."""
        artifact = self._wandb.Artifact(f"export-{self.run.id}", type="model", metadata={"step": step},
                                        description="final export of both branches: S, U, config.yaml")
        artifact.add_dir(str(folder), policy="immutable")
        self.run.log_artifact(artifact, aliases=["final", f"step-{step}"])

    def finish(self) -> None:
        self.run.finish()
        # What wandb's atexit hook would do; the CLI ends the process with os._exit (no atexit).
        teardown = getattr(self._wandb, "teardown", None)
        if teardown is not None:
            teardown()


class TensorBoardTracker(Tracker):
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError as exc:
            raise TrackerError(
                "train.report_to=tensorboard needs the tensorboard package (`pip install tensorboard`)"
            ) from exc
        import yaml  # noqa: PLC0415

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for name, array in images.items():
            self.writer.add_image(name, array, step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


def build_tracker(kind: str, output_dir: str | Path, config: dict[str, Any], project: str,
                  run_name: str | None, is_main: bool) -> Tracker:
    if not is_main or kind == "none":
        return Tracker()
    if kind == "wandb":
        return WandbTracker(Path(output_dir), config, project, run_name)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(output_dir), config)
    raise TrackerError(f"train.report_to: {kind!r} is not one of wandb, tensorboard, none")


def colorize(depth: Any, confidence: Any) -> tuple[np.ndarray, np.ndarray]:
    """First image of ``(B,1,H,W)`` depth and confidence → two ``(H, W, 3)`` uint8 pictures."""
    try:
        from distill_depth.viz import colorize_confidence, colorize_depth  # noqa: PLC0415
    except ImportError:
        return _fallback_colorize(depth, inverse=True), _fallback_colorize(confidence, inverse=False)
    return colorize_depth(depth[:1])[0], colorize_confidence(confidence[:1])[0]


def _fallback_colorize(maps: Any, inverse: bool) -> np.ndarray:
    """Grey ramp (inverse depth normalised per image, confidence on 0..1)."""
    array = maps[0, 0].detach().float().cpu().numpy()
    if inverse:
        array = np.where(array > 0, 1.0 / np.maximum(array, 1e-6), 0.0)
        array = array / max(float(array.max()), 1e-6)
    grey = (np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
