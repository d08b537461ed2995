"""The two branches of METHOD.md as self-contained modules: S (LiDAR) and U (video and/or stereo).

``base``: what both share (augmenter, DepthNet, canonical mapping, distillation, inference);
``supervised``: branch S; ``self_supervised``: branch U. Each owns its forward and its loss.
"""

from __future__ import annotations

from torch import nn

from distill_depth.branches.base import PARTNER, TEMPORAL_SOURCES, BranchBase, BranchError, labelled_lidar, network_input
from distill_depth.branches.self_supervised import SelfSupervisedBranch
from distill_depth.branches.supervised import SupervisedBranch
from distill_depth.config import Config

__all__ = [
    "PARTNER",
    "TEMPORAL_SOURCES",
    "BranchBase",
    "BranchError",
    "SelfSupervisedBranch",
    "SupervisedBranch",
    "build_branch",
    "labelled_lidar",
    "network_input",
]


def build_branch(name: str, cfg: Config) -> nn.Module:
    """``"S"`` → :class:`SupervisedBranch`, ``"U"`` → :class:`SelfSupervisedBranch`."""
    if name == "S":
        return SupervisedBranch(cfg)
    if name == "U":
        return SelfSupervisedBranch(cfg)
    raise BranchError(f"branch name must be 'S' or 'U', got {name!r}")
