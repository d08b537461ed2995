"""Training: the loop, per-group DDP, checkpoints, tracking, signals (``distill-depth train``)."""

from __future__ import annotations

from typing import Any

__all__ = ["load_branches"]


def __getattr__(name: str) -> Any:
    # Lazy: importing ``distill_depth.train.cli``/``.signals`` must not import torch, so the stop
    # handler is in place within milliseconds of process start (SLURM may signal at any time).
    if name == "load_branches":
        from distill_depth.checkpoint_io import load_branches  # noqa: PLC0415

        return load_branches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
