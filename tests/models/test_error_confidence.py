"""ErrorConfidenceNet: a (0, 1) map of the input's size whose gradient never reaches its depth inputs."""

from __future__ import annotations

import pytest
import torch

from distill_depth.models import ErrorConfidenceNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("size", [(32, 96), (17, 33)])
def test_shape_range_and_detached_inputs(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = ErrorConfidenceNet()
    image = torch.rand(2, 3, *size)
    disparity = torch.rand(2, 1, *size, requires_grad=True)
    confidence = torch.rand(2, 1, *size, requires_grad=True)
    out = net(image, disparity, confidence)
    assert out.shape == (2, 1, *size)
    assert ((out > 0) & (out < 1)).all()
    out.sum().backward()
    assert disparity.grad is None and confidence.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_it_learns_to_tell_textured_from_uniform_patches() -> None:
    """The job it exists for: a photometric loss cannot judge depth on a uniform patch, LiDAR can.
    Trained on an image whose left half is noise (target C = 1) and right half uniform (C = 0.2),
    the net separates the halves, from the image alone (disparity and confidence are constant)."""
    torch.manual_seed(0)
    net = ErrorConfidenceNet()
    image = torch.rand(4, 3, 24, 48)
    image[..., 24:] = 0.5
    target = torch.ones(4, 1, 24, 48)
    target[..., 24:] = 0.2
    flat = torch.full((4, 1, 24, 48), 0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(net(image, flat, flat), target)
        loss.backward()
        optimizer.step()
    out = net(image, flat, flat).detach()
    # away from the seam, where the receptive field sees one kind of patch only
    assert out[..., :8].mean() > 0.8 and out[..., 40:].mean() < 0.35
