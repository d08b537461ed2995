"""The pictures a run logs: one panel per sample of a fixed validation batch, in the canonical
(un-augmented) frame: input | S depth | U depth | S confidence | U confidence | LiDAR.

The same samples every time (the first ``PANEL_SAMPLES`` of the val shards), so panels compare
over steps; rendered by ``distill_depth.viz`` like ``predict --format color``. Each branch's
group leader infers its branch; rank 0 joins the maps (a branch this run does not train is left out).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch

from distill_depth.topology import Topology
from distill_depth.train.distributed import gather_objects
from distill_depth.train.rng import isolated_rng
from distill_depth.types import Batch

PANEL_SAMPLES = 4


def fixed_panel_batch(val_shards: str | None, device: torch.device) -> Batch | None:
    """The first :data:`PANEL_SAMPLES` validation samples (identical on every rank), or None."""
    if not val_shards:
        return None
    from distill_depth.data.stream import eval_batches  # noqa: PLC0415

    with isolated_rng():  # a DataLoader draws its seed from the global RNG: training's draws stay as they were
        batch = next(iter(eval_batches(val_shards, PANEL_SAMPLES, 0, 1, num_workers=0)), None)
    return None if batch is None else batch.to(device)


@torch.no_grad()
def log_panels(models: dict[str, Any], batch: Batch, topology: Topology, tracker: Any, step: int,
               autocast: Callable[[], contextlib.AbstractContextManager], is_main: bool) -> None:
    """Infer the fixed batch with each local branch this rank leads, gather, render, log (collective)."""
    maps = {}
    for name, model in models.items():
        if topology.is_group_leader(name):
            with autocast():
                depth, confidence = model.infer(batch.image)
            maps[name] = (depth.float().cpu(), confidence.float().cpu())
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for rank_maps in gather_objects(maps):
        merged.update(rank_maps)
    if is_main and merged:
        pictures = render_panels(batch.image, merged, batch.sparse_depth)
        tracker.log_images({f"images/panel/{i}": picture for i, picture in enumerate(pictures)}, step)


def render_panels(image: torch.Tensor, maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  lidar: torch.Tensor) -> np.ndarray:
    """``(B, H, W_total, 3)`` uint8: input | depth per branch | confidence per branch | LiDAR."""
    from distill_depth.viz import colorize_confidence, colorize_depth, image_to_uint8, join_panels  # noqa: PLC0415

    names = [n for n in ("S", "U") if n in maps]
    panels = [image_to_uint8(image)]
    panels += [colorize_depth(maps[n][0]) for n in names]
    panels += [colorize_confidence(maps[n][1]) for n in names]
    panels.append(colorize_depth(lidar))
    return join_panels(panels)
