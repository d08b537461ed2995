"""The types that travel between the stream, the branches, the topology and the trainer.

Shapes follow kornia's convention: ``(B, C, H, W)``; depth in metres, images float in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

SOURCE_NAMES = ("prev", "next", "stereo")
"""Names of the source frames a sample may carry: temporal t-1, t+1 and the stereo partner."""


@dataclass
class Batch:
    """A batch of target frames with everything either branch may need.

    image: ``(B, 3, H, W)`` target frame I_t in [0, 1].
    sources: ``{"prev": (B, 3, H, W), "next": ..., "stereo": ...}`` (stereo only when present).
    sparse_depth: ``(B, 1, H, W)`` projected LiDAR D*, metres, 0 where no point.
    K: ``(B, 3, 3)`` intrinsics at ``(H, W)``.
    keys: sample keys ``{drive}_{side}_{frame:010d}``, one per batch element.
    gt_depth: ``(B, 1, H, W)`` dense or improved ground truth, metres, 0 = none (optional).
    stereo_T: ``(B, 4, 4)`` rigid transform with ``X_stereo = stereo_T @ X_target`` (optional).
    labelled: ``(B,)`` bool, samples whose ``sparse_depth`` is supervision (``None``: all are);
        an unlabelled sample's ``sparse_depth`` is all zeros.
    regions: ``(B, 1, H, W)`` uint8 region bitmask (``distill_depth.data.regions``), at gt_depth's size (optional).
    """

    image: Tensor
    sources: dict[str, Tensor]
    sparse_depth: Tensor
    K: Tensor
    keys: list[str]
    gt_depth: Tensor | None = None
    stereo_T: Tensor | None = None
    labelled: Tensor | None = None
    regions: Tensor | None = None

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            image=move(self.image),
            sources={k: move(v) for k, v in self.sources.items()},
            sparse_depth=move(self.sparse_depth),
            K=move(self.K),
            gt_depth=move(self.gt_depth),
            stereo_T=move(self.stereo_T),
            labelled=move(self.labelled),
            regions=move(self.regions),
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Elements ``start:stop`` (a U rank's share of its cell's batch)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return replace(
            self,
            image=cut(self.image),
            sources={k: cut(v) for k, v in self.sources.items()},
            sparse_depth=cut(self.sparse_depth),
            K=cut(self.K),
            keys=self.keys[start:stop],
            gt_depth=cut(self.gt_depth),
            stereo_T=cut(self.stereo_T),
            labelled=cut(self.labelled),
            regions=cut(self.regions),
        )


@dataclass
class PartnerPrediction:
    """What crosses between branches: detached, canonical-frame, full resolution.

    depth: ``(B, 1, H, W)`` metres. confidence: ``(B, 1, H, W)`` in (0, 1).
    valid: ``(B, 1, H, W)`` bool, pixels the sender saw (an augmentation crop leaves holes).
    keys: the sample keys the tensors belong to, in order.
    """

    depth: Tensor
    confidence: Tensor
    valid: Tensor
    keys: list[str]

    def slice(self, start: int, stop: int) -> PartnerPrediction:
        return PartnerPrediction(
            self.depth[start:stop], self.confidence[start:stop], self.valid[start:stop], self.keys[start:stop]
        )

    @staticmethod
    def cat(parts: list[PartnerPrediction]) -> PartnerPrediction:
        return PartnerPrediction(
            torch.cat([p.depth for p in parts]),
            torch.cat([p.confidence for p in parts]),
            torch.cat([p.valid for p in parts]),
            [k for p in parts for k in p.keys],
        )


@dataclass
class Prediction:
    """A branch's forward output.

    depth / confidence: per scale, ``(B, 1, H_s, W_s)`` in the branch's augmented frame, with
        gradients (index 0 is full resolution).
    canonical_depth / canonical_confidence: ``(B, 1, H, W)`` mapped back to the un-augmented
        frame, still with gradients (the distillation student side uses them).
    canonical_valid: ``(B, 1, H, W)`` bool, where the canonical maps are defined.
    keys: sample keys.
    extras: branch-private values carried from forward to loss (poses, augmented targets...).
    """

    depth: list[Tensor]
    confidence: list[Tensor]
    canonical_depth: Tensor
    canonical_confidence: Tensor
    canonical_valid: Tensor
    keys: list[str]
    extras: dict[str, Any] = field(default_factory=dict)
    teacher: tuple[Tensor, Tensor] | None = None
    """(depth, confidence) ``(B, 1, H, W)`` of an extra pass on the un-augmented image
    (``loss.teacher_view: clean``): sent instead of the canonical maps, valid everywhere."""

    def for_partner(self) -> PartnerPrediction:
        """The detached copy that is exchanged with the other branch."""
        if self.teacher is not None:
            depth, confidence = self.teacher
            valid = torch.ones_like(self.canonical_valid, dtype=torch.bool)
            return PartnerPrediction(depth.detach().float(), confidence.detach().float(), valid, list(self.keys))
        return PartnerPrediction(
            self.canonical_depth.detach().float(),
            self.canonical_confidence.detach().float(),
            self.canonical_valid.detach(),
            list(self.keys),
        )
