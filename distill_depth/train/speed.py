"""The speed switches of a branch's networks: ``train.channels_last`` and ``train.compile``.

Both act on the networks only (depth net, pose net), never on augmentation or the losses, and
neither changes a parameter's name: checkpoints, exports and ``train.init_*`` see the same keys.

Compile is applied to the inner networks, before DDP (or DeepSpeed) wraps the branch:

* ``nn.Module.compile`` compiles in place: no ``OptimizedModule`` and no ``_orig_mod.`` prefix in
  ``state_dict()``, so checkpoint and export code stay as they are;
* DDP stays the outermost, eager module: its gradient hooks, buckets and
  ``find_unused_parameters`` walk of the autograd graph work on compiled regions unchanged
  (parameters enter the compiled graphs as inputs). Compiling the DDP-wrapped branch would
  pull kornia's random, data-dependent augmentation and the Python ``Prediction`` objects into
  dynamo (graph breaks and recompiles) and rely on DDPOptimizer's graph splitting;
* the cost: a compiled backward hands its gradients to DDP at its end, so all-reduce overlaps
  less with the backward of that network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill_depth.config import TrainConfig


def networks(branch: nn.Module) -> list[nn.Module]:
    """The branch's networks: its depth net and, when it has one, its pose net."""
    return [net for net in (branch.depth_net, getattr(branch, "pose_net", None)) if net is not None]


def use_channels_last(branch: nn.Module) -> None:
    """Networks' weights and their input images (``network_input``) in channels-last layout.

    Call before the optimiser and DDP are built: DDP's gradient buckets follow the parameters'
    strides as they are at wrap time.
    """
    for net in networks(branch):
        net.to(memory_format=torch.channels_last)
    branch.memory_format = torch.channels_last


def compile_networks(branch: nn.Module, **options: Any) -> None:
    """``torch.compile`` each network in place (``options``: those of ``torch.compile``, e.g.
    ``backend``). The first calls compile (minutes on a CPU); each new input shape, train/eval
    mode or autocast setting compiles once more."""
    for net in networks(branch):
        net.compile(**options)


def apply_speed_switches(branch: nn.Module, train: TrainConfig, **compile_options: Any) -> nn.Module:
    """``train.channels_last`` then ``train.compile`` (compile sees the layout it will run with)."""
    if train.channels_last:
        use_channels_last(branch)
    if train.compile:
        compile_networks(branch, **compile_options)
    return branch
