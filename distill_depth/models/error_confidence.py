"""ErrorConfidenceNet: a branch's confidence on S's scale, learnt from LiDAR, blind to the depth net."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ErrorConfidenceNet(nn.Module):
    """(image, disparity, confidence) of a branch → C in (0, 1), (B, 1, H, W): the confidence of the
    branch's depth on S's scale, trained (``losses.lidar_confidence_nll``) toward min(1, τ_s/ρ) with ρ
    the log-depth error at LiDAR pixels (``loss.u_confidence_target: lidar``).

    Inputs: image (B, 3, H, W) in [0, 1]; the branch's sigmoid disparity and own confidence, each
    (B, 1, H, W), detached here, so nothing this net learns reaches the depth network. A small
    fully convolutional net, dilations 1-2-4-8: a receptive field of 31 pixels sees whether a patch
    has texture to warp and where a surface ends, what the photometric confidence cannot tell.
    """

    INPUT_CHANNELS = 5

    def __init__(self, width: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = self.INPUT_CHANNELS
        for dilation in dilations:
            layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ELU(inplace=True)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, image: Tensor, disparity: Tensor, confidence: Tensor) -> Tensor:
        x = torch.cat([image, disparity.detach().to(image.dtype), confidence.detach().to(image.dtype)], dim=1)
        return torch.sigmoid(self.head(self.body(x)))
