"""Evaluate loaded branches on a stream of batches: one record per (image, output).

Pure of process handling: the caller gives the batches of its rank and gathers the records.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from distill_depth.evaluation.inference import DepthBranch, fuse, infer_at_size, network_size, resize_map
from distill_depth.evaluation.protocol import (
    EvaluationError,
    Protocol,
    evaluation_mask,
    ground_truth,
    prepare_prediction,
)
from distill_depth.data.regions import REGION_BITS
from distill_depth.metrics import METRIC_NAMES, ause_aurg, depth_metrics
from distill_depth.types import Batch
from distill_depth.viz import side_by_side

FUSED = "fused"


@dataclass
class EvalSettings:
    protocol: Protocol
    outputs: tuple[str, ...]
    """What is evaluated, in order: "S", "U" and/or "fused" (fused needs models S and U)."""
    median_scaling: dict[str, bool]
    """Per output: whether its depth is median-scaled to the ground truth (per image)."""
    flip_tta: bool = False
    input_size: tuple[int, int] | None = None
    """Network input ``(H, W)`` (the training size); None: the image's size rounded up to ×32."""
    align_u_scale: bool = False
    """Fusion rescales U to S's median first (U without metric scale); see ``inference.fuse``."""
    regions: bool = False
    """Also every metric per region of the shards' ``regions.png`` (``distill_depth.data.regions``)."""
    save_predictions: Path | None = None
    save_images: Path | None = None
    sparsification_steps: int = 20


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic write: a crash never leaves a truncated file under the final name."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _predict_outputs(
    models: dict[str, DepthBranch], image: Tensor, settings: EvalSettings
) -> dict[str, tuple[Tensor, Tensor]]:
    size = network_size(tuple(image.shape[-2:]), settings.input_size)
    needed = {name for name in settings.outputs if name != FUSED}
    if FUSED in settings.outputs:
        needed |= {"S", "U"}
    raw = {
        name: infer_at_size(models[name], image, size, flip_tta=settings.flip_tta)
        for name in ("S", "U")
        if name in needed
    }
    outputs = {name: raw[name] for name in settings.outputs if name != FUSED}
    if FUSED in settings.outputs:
        outputs[FUSED] = fuse(*raw["S"], *raw["U"], align_u_scale=settings.align_u_scale)
    return {name: outputs[name] for name in settings.outputs}


def evaluate_batch(models: dict[str, DepthBranch], batch: Batch, settings: EvalSettings) -> list[dict]:
    """Records ``{"key", "output", <metrics>, "scale", "ause", "aurg", "valid_pixels"}`` of one batch."""
    gt = ground_truth(batch, settings.protocol)
    mask = evaluation_mask(gt, settings.protocol)
    valid_pixels = mask.flatten(1).sum(dim=1).tolist()
    records: list[dict] = []
    for name, (depth, confidence) in _predict_outputs(models, batch.image, settings).items():
        final, ratio = prepare_prediction(
            depth, gt, mask, settings.protocol, median_scaling=settings.median_scaling[name]
        )
        confidence = resize_map(confidence, tuple(gt.shape[-2:]))
        metrics = depth_metrics(final, gt, mask)
        ause, aurg = ause_aurg(final, gt, mask, confidence, steps=settings.sparsification_steps)
        for i, key in enumerate(batch.keys):
            record = {"key": key, "output": name}
            record.update({m: float(metrics[m][i]) for m in METRIC_NAMES})
            record.update(
                scale=float(ratio[i]), ause=float(ause[i]), aurg=float(aurg[i]), valid_pixels=int(valid_pixels[i])
            )
            records.append(record)
        if settings.regions:
            for record, per_region in zip(records[-len(batch.keys):], _region_metrics(final, gt, mask, confidence,
                                                                                       batch, settings)):
                record["regions"] = per_region
        if settings.save_predictions is not None:
            for i, key in enumerate(batch.keys):
                _save_npy(settings.save_predictions / f"{key}_{name}.npy", final[i, 0].float().cpu().numpy())
        if settings.save_images is not None:
            image = resize_map(batch.image.float(), tuple(gt.shape[-2:]))
            panels = side_by_side(image, final, confidence, gt)
            for i, key in enumerate(batch.keys):
                Image.fromarray(panels[i]).save(settings.save_images / f"{key}_{name}.png")
    return records


def _region_metrics(
    final: Tensor, gt: Tensor, mask: Tensor, confidence: Tensor, batch: Batch, settings: EvalSettings
) -> list[dict[str, dict]]:
    """Per image: ``{region: {<metrics>, "ause", "aurg", "valid_pixels"}}``, the protocol's mask ∧ the region.

    The prediction (and its median scale) is the whole image's; only the pixels averaged differ."""
    if batch.regions is None:
        raise EvaluationError("--regions needs shards with regions.png entries (make-shards of a synth tree made "
                              "with a failure mode or --regions)")
    if tuple(batch.regions.shape[-2:]) != tuple(gt.shape[-2:]):
        raise EvaluationError(f"regions.png is {tuple(batch.regions.shape[-2:])}, ground truth {tuple(gt.shape[-2:])}")
    out: list[dict[str, dict]] = [{} for _ in batch.keys]
    for region, bit in REGION_BITS.items():
        region_mask = mask & ((batch.regions.to(torch.int32) & bit) != 0)
        metrics = depth_metrics(final, gt, region_mask)
        ause, aurg = ause_aurg(final, gt, region_mask, confidence, steps=settings.sparsification_steps)
        counts = region_mask.flatten(1).sum(dim=1).tolist()
        for i in range(len(batch.keys)):
            row = {m: float(metrics[m][i]) for m in METRIC_NAMES}
            row.update(ause=float(ause[i]), aurg=float(aurg[i]), valid_pixels=int(counts[i]))
            out[i][region] = row
    return out


@torch.no_grad()
def evaluate_stream(
    models: dict[str, DepthBranch], batches: Iterable[Batch], settings: EvalSettings, device: torch.device
) -> list[dict]:
    """Every record of this process's batches, in stream order."""
    for module in models.values():
        if hasattr(module, "eval"):
            module.eval()
    for folder in (settings.save_predictions, settings.save_images):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for batch in batches:
        records.extend(evaluate_batch(models, batch.to(device), settings))
    return records
