"""DepthNet / PoseNet: output shapes per scale, disparity→depth, weight loading from local files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from distill_depth.config import ModelConfig
from distill_depth.models import DepthNet, PoseNet, WeightsError, depth_to_disp, disp_to_depth

H, W = 64, 192


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("encoder", ["resnet18", "convnext_tiny"])
def test_depth_net_shapes_per_scale(encoder: str) -> None:
    torch.manual_seed(0)
    net = DepthNet(ModelConfig(encoder=encoder))
    disps, confs = net(torch.rand(2, 3, H, W))
    assert len(disps) == len(confs) == 4
    for s, (d, c) in enumerate(zip(disps, confs)):
        assert d.shape == c.shape == (2, 1, H // 2**s, W // 2**s)
        assert ((d > 0) & (d < 1)).all() and ((c > 0) & (c < 1)).all()


def test_depth_net_odd_size_and_fewer_scales() -> None:
    net = DepthNet(ModelConfig(num_scales=2))
    disps, _ = net(torch.rand(1, 3, 50, 70))
    assert [tuple(d.shape[-2:]) for d in disps] == [(50, 70), (25, 35)]


def test_disp_to_depth_range_and_inverse() -> None:
    disp = torch.tensor([0.0, 0.5, 1.0])
    depth = disp_to_depth(disp, 0.1, 100.0)
    assert depth[0].item() == pytest.approx(100.0) and depth[2].item() == pytest.approx(0.1)
    assert depth[1].item() == pytest.approx(1.0 / (0.01 + 9.99 * 0.5))
    torch.testing.assert_close(depth_to_disp(depth, 0.1, 100.0), disp, atol=1e-6, rtol=0)
    assert disp_to_depth(disp.bfloat16(), 0.1, 100.0).dtype == torch.float32


def _resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_local_file(tmp_path: Path, suffix: str) -> None:
    state = _resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    cfg = ModelConfig(pretrained="file", weights=str(path))
    net = DepthNet(cfg)
    torch.testing.assert_close(net.encoder.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    torch.testing.assert_close(net.encoder.state_dict()["bn1.running_var"], state["bn1.running_var"])
    # the pose net's first conv: RGB filters duplicated for the second frame and halved
    pose = PoseNet(cfg)
    conv1 = pose.encoder.state_dict()["conv1.weight"]
    assert conv1.shape[1] == 6
    torch.testing.assert_close(conv1, torch.cat([state["conv1.weight"]] * 2, dim=1) / 2)
    torch.testing.assert_close(pose.encoder.state_dict()["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "resnet18.safetensors"
    with pytest.raises(WeightsError, match="nowhere/resnet18.safetensors"):
        DepthNet(ModelConfig(pretrained="file", weights=str(missing)))


def test_wrong_weights_file_reports_mismatches(tmp_path: Path) -> None:
    state = _resnet18_state()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer2.0.bn1.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        DepthNet(ModelConfig(pretrained="file", weights=str(path)))
    message = str(info.value)
    assert str(path) in message and "layer1.0.conv1.weight" in message and "layer2.0.bn1.bias" in message


def test_pose_net_starts_at_the_identity_and_scales_translation() -> None:
    """Exactly zero motion at initialisation; the translation is the head's output times
    ``model.pose_translation_scale`` (the rotation keeps Monodepth2's 0.01)."""
    target, source = torch.rand(2, 3, H, W), torch.rand(2, 3, H, W)
    outputs = {}
    for scale in (1.0, 0.01):
        torch.manual_seed(0)
        pose = PoseNet(ModelConfig(pose_translation_scale=scale)).eval()
        axis_angle, translation = pose(target, source)
        assert axis_angle.shape == translation.shape == (2, 3)
        assert torch.count_nonzero(axis_angle) == torch.count_nonzero(translation) == 0
        torch.nn.init.normal_(pose.head[-1].weight, std=0.1)
        outputs[scale] = pose(target, source)
    torch.testing.assert_close(outputs[0.01][1], outputs[1.0][1] * 0.01)
    torch.testing.assert_close(outputs[0.01][0], outputs[1.0][0])
    assert outputs[1.0][1].abs().max() > 100 * outputs[1.0][0].abs().max() / 2
