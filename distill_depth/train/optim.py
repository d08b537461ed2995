"""One optimiser and one learning-rate schedule per branch (``optim.*``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from distill_depth.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the branch; parameters under a ``pose`` sub-module use ``optim.lr_pose``."""
    pose, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (pose if "pose" in name.split(".")[0] else rest).append(param)
    groups = [{"params": rest, "lr": cfg.lr}]
    if pose:
        groups.append({"params": pose, "lr": cfg.lr if cfg.lr_pose is None else cfg.lr_pose})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, then
    constant, step decay (×decay_factor at each milestone fraction of ``max_steps``) or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        passed = sum(step >= round(m * max_steps) for m in cfg.milestones)
        return cfg.decay_factor**passed
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, max_steps, cfg))
