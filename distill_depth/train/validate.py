"""Validation of the branches a rank runs, on val shards, gathered to global rank 0."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from distill_depth.config import Config
from distill_depth.evaluation.inference import needs_median_scaling
from distill_depth.metrics import depth_metrics, median_scale, range_mask
from distill_depth.topology import Topology
from distill_depth.train.distributed import gather_objects

MAX_VAL_DEPTH = 80.0


@torch.no_grad()
def validate(
    models: dict[str, nn.Module],
    topology: Topology,
    cfg: Config,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    heartbeat: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """``{"val/S/abs_rel": ..., "val/U/a1": ...}`` over the whole val set (collective; result on rank 0).

    Target: ``gt_depth`` when the shards carry it, else the sparse LiDAR depth. A branch is
    median-scaled per image when it has no metric signal (the rule of ``distill-depth evaluate
    --median-scaling auto``: U without stereo and without S's depth distilled into it). Each
    branch's val set is split over the ranks of its group, every sample evaluated once.
    """
    from distill_depth.data.stream import eval_batches  # noqa: PLC0415

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, model in models.items():
        model.eval()
        batches = eval_batches(cfg.data.val_shards, cfg.data.batch_size, topology.group_rank(name),
                               topology.group_size(name), num_workers=0)
        for i, batch in enumerate(batches):
            if cfg.train.val_batches is not None and i >= cfg.train.val_batches:
                break
            batch = batch.to(device)
            with autocast():
                depth, _ = model.infer(batch.image)
            depth = depth.float().clamp(1e-3, MAX_VAL_DEPTH)
            target = batch.gt_depth if batch.gt_depth is not None else batch.sparse_depth
            valid = range_mask(target, 1e-3, MAX_VAL_DEPTH)
            if needs_median_scaling(cfg, "auto", name):
                depth, _ = median_scale(depth, target, valid)
                depth = depth.clamp(1e-3, MAX_VAL_DEPTH)
            for metric, values in depth_metrics(depth, target, valid).items():
                finite = values[torch.isfinite(values)]
                key = f"val/{name}/{metric}"
                sums[key] = sums.get(key, 0.0) + float(finite.sum())
                counts[key] = counts.get(key, 0) + int(finite.numel())
            heartbeat()
        model.train()
    total_sums: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    for rank_sums, rank_counts in gather_objects((sums, counts)):
        for key, value in rank_sums.items():
            total_sums[key] = total_sums.get(key, 0.0) + value
            total_counts[key] = total_counts.get(key, 0) + rank_counts[key]
    return {k: (total_sums[k] / total_counts[k] if total_counts[k] else math.nan) for k in sorted(total_sums)}


