"""The speed switches of a branch: ``train.channels_last`` and ``train.compile``.

``channels_last`` acts on the networks (depth net, pose net); ``compile`` on the networks
(``on``) and on the branch's element-wise loss functions (``on`` and ``losses``); neither touches
augmentation, and neither changes a parameter's name: checkpoints, exports and ``train.init_*``
see the same keys.

The loss functions (``branch.loss_kernels``: U's photometric error with its SSIM, per-pixel minimum
and auto-mask, its confidence NLL and smoothness) are chains of memory-bound element-wise ops at
full resolution: compiled, inductor fuses each chain into a few loops. On the 2-core CPU that made
U's whole step ~0.8x as long at 640x192 (``benchmarks/vs_monodepth2.py``), while compiling the
networks measured no faster there (convolutions are library calls either way) and takes minutes.
They are compiled with ``dynamic=False``: every call of a step has the same shapes, and each of
U's 4 scales compiles its smoothness once.

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

from typing import Any, Callable

import torch
from torch import nn

from distill_depth.config import TrainConfig
from distill_depth.losses.common import fp32


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


def compiled_loss(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``; for a function decorated with ``losses.common.fp32``, the
    function's body compiled inside the (eager) fp32 cast.

    Why not the decorated function itself: dynamo keeps its compiled graphs per code object, and
    every ``fp32`` function is the same ``wrapper`` code around a different body, so the graphs of
    all of them would share one cache. It holds 8 (``recompile_limit``); U's 4 kernels with
    smoothness at 4 scales and S's make more, and past the limit dynamo silently runs the rest eager.
    """
    body = getattr(fn, "fp32_body", None)
    if body is None:
        return torch.compile(fn, dynamic=False, **options)
    return fp32(torch.compile(body, dynamic=False, **options))


def compile_losses(branch: nn.Module, **options: Any) -> None:
    """Compile each of the branch's ``loss_kernels`` (pure functions held as attributes, see
    :func:`compiled_loss`), replacing the attribute on this instance only; the class keeps the
    eager functions."""
    for name in branch.loss_kernels:
        setattr(branch, name, compiled_loss(getattr(type(branch), name), **options))


def apply_speed_switches(branch: nn.Module, train: TrainConfig, **compile_options: Any) -> nn.Module:
    """``train.channels_last`` then ``train.compile`` (compile sees the layout it will run with)."""
    if train.channels_last:
        use_channels_last(branch)
    if train.compile == "on":
        compile_networks(branch, **compile_options)
    if train.compile in ("on", "losses"):
        compile_losses(branch, **compile_options)
    return branch
