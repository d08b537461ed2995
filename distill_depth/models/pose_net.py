"""PoseNet: relative camera motion from a stacked (target, source) pair."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from distill_depth.config import ModelConfig
from distill_depth.models.encoder import InputNormalize, create_encoder

log = logging.getLogger(__name__)

ROTATION_SCALE = 0.01
"""Axis-angle output scale (radians per unit of the head's output; Monodepth2's 0.01)."""


class PoseNet(nn.Module):
    """(target, source), each (B, 3, H, W) in [0, 1] → (axis_angle (B, 3), translation (B, 3)) of
    T_target_to_source (X_source = T · X_target), translation in the depth network's units.

    The encoder (``cfg.pose_encoder``) sees the two frames stacked into 6 channels; its first conv is
    widened to 6 inputs (pretrained RGB filters duplicated and halved). The head squeezes the
    deepest feature map, two 3×3 convs, a 1×1 conv to 6 numbers per location, spatial mean; the
    rotation is ×0.01, the translation ×``cfg.pose_translation_scale``.

    Why not Monodepth2's head as is (measured from random initialisation; docs/method.md,
    "Our readings where the paper is unknown"):
    its ReLUs died (every image got the same pose), hence ELU. The last conv starts at zero, so
    training starts from the identity motion exactly (Monodepth2 gets near it by scaling
    everything by 0.01). The translation scale sets the units the head reaches: once depth is
    metric (S's LiDAR distilled into U, or the stereo baseline) a car's ~1 m per frame is needed,
    an output of ~100 at ×0.01; until the translation gets there, warping barely depends on
    depth and the photometric loss cannot teach it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pretrained, weights = cfg.pretrained, cfg.weights
        if pretrained == "file" and cfg.pose_encoder != cfg.encoder:
            # model.weights holds the depth encoder's weights; they cannot fit another architecture.
            log.warning(
                "model.weights is for encoder %r; pose encoder %r starts from random weights",
                cfg.encoder,
                cfg.pose_encoder,
            )
            pretrained, weights = "none", None
        self.encoder = create_encoder(cfg.pose_encoder, pretrained, weights, in_chans=6)
        self.normalize = InputNormalize(self.encoder)
        deepest = self.encoder.feature_info.channels()[-1]
        self.head = nn.Sequential(
            nn.Conv2d(deepest, 256, 1),
            nn.ELU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ELU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ELU(inplace=True),
            nn.Conv2d(256, 6, 1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.translation_scale = float(cfg.pose_translation_scale)

    def forward(self, target: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
        stacked = self.normalize(torch.cat([target, source], dim=1))
        motion = self.head(self.encoder(stacked)[-1]).mean(dim=(2, 3))
        return motion[:, :3] * ROTATION_SCALE, motion[:, 3:] * self.translation_scale
