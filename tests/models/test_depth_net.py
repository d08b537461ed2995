"""DepthNet / PoseNet: output shapes per scale, disparity→depth, weight loading from local files, the
compilable replicate padding."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from distill_depth.config import ModelConfig
from distill_depth.models import DepthNet, PoseNet, WeightsError, depth_to_disp, disp_to_depth
from distill_depth.models.depth_net import ReplicateConv2d, replicate_pad1_by_cat

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


# --- replicate padding that compiles --------------------------------------------------------------


def _padding_mode_conv(conv: ReplicateConv2d) -> nn.Conv2d:
    """The decoder's convolution before ReplicateConv2d, with ``conv``'s weights."""
    old = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, padding_mode="replicate")
    old.load_state_dict(conv.state_dict())
    return old


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 5, 1, 6)])  # 1-pixel-high maps occur in the decoder
@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_pad_by_cat_equals_f_pad(shape: tuple[int, ...], channels_last: bool) -> None:
    """The padding compiled code uses: the same values, and the same input gradient to rounding."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=layout)
    upstream = torch.randn(*shape[:2], shape[2] + 2, shape[3] + 2)
    grads = []
    for pad in (lambda t: F.pad(t, (1, 1, 1, 1), mode="replicate"), replicate_pad1_by_cat):
        inp = x.clone().requires_grad_(True)
        out = pad(inp)
        out.backward(upstream)
        grads.append((out, inp.grad))
    assert torch.equal(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_conv_equals_the_padding_mode_conv(channels_last: bool) -> None:
    """Forward and every gradient (input, weight, bias) of the old module, same weights."""
    torch.manual_seed(0)
    new = ReplicateConv2d(5, 7)
    old = _padding_mode_conv(new)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 6, 11).contiguous(memory_format=layout)
    upstream = torch.randn(2, 7, 6, 11)
    results = []
    for conv in (old, new):
        inp = x.clone().requires_grad_(True)
        out = conv(inp)
        out.backward(upstream)
        results.append((out, inp.grad, conv.weight.grad, conv.bias.grad))
    for reference, value in zip(*results):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


def test_depth_net_loads_the_weights_of_padding_mode_convs() -> None:
    """A checkpoint of the network before ReplicateConv2d has the same keys: it loads strictly and
    gives the same outputs."""
    torch.manual_seed(0)
    net = DepthNet(ModelConfig(num_scales=2)).eval()
    old = copy.deepcopy(net)
    replaced = 0
    for name, module in list(old.named_modules()):
        if isinstance(module, ReplicateConv2d):
            parent, _, child = name.rpartition(".")
            setattr(old.get_submodule(parent), child, _padding_mode_conv(module))
            replaced += 1
    assert replaced > 10 and not any(isinstance(m, ReplicateConv2d) for m in old.modules())
    net.load_state_dict(old.state_dict(), strict=True)
    image = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        for reference, value in zip(*(sum(model(image), []) for model in (old, net))):
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")
def test_replicate_conv_compiles_with_inductor() -> None:
    """The blocker of ``train.compile``: inductor (torch 2.14, CPU) failed on the backward of one
    ``padding_mode="replicate"`` conv alone (a stride assertion in ``replication_pad2d_backward``).
    Compiled gradients equal eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    stack = ReplicateConv2d(3, 4)
    compiled = copy.deepcopy(stack)
    compiled.compile(backend="inductor")
    x = torch.rand(1, 3, 16, 24)
    results = []
    for model in (stack, compiled):
        inp = x.clone().requires_grad_(True)
        model(inp).square().mean().backward()
        results.append([inp.grad] + [p.grad for p in model.parameters()])
    for reference, value in zip(*results):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
