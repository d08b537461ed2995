"""Training: the loop, per-group DDP, checkpoints, tracking, signals (``distill-depth train``)."""

from distill_depth.train.checkpoint import load_branches

__all__ = ["load_branches"]
