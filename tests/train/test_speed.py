"""``train.channels_last`` and ``train.compile``: a branch step (forward, loss, backward) gives what
the default step gives, bf16 autocast stays finite, and the weights keep their names and layout on disk."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_depth.branches import build_branch
from distill_depth.config import Config, TrainConfig
from distill_depth.train.checkpoint import export_branches
from distill_depth.train.setup import build_branch_states
from distill_depth.train.speed import apply_speed_switches, compile_losses, compile_networks, use_channels_last
from distill_depth.train.step import autocast_factory
from distill_depth.types import Batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_branches import synthetic_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 32, 96

INDUCTOR_ENV = "DISTILL_DEPTH_TEST_INDUCTOR"
"""Set to 1 to also run the compiled steps with inductor (the backend ``train.compile`` uses): a
cold compile of the depth net took 5.5 min on a busy 2-core CPU (12 s with inductor's cache warm),
one of U's loss functions ~40 s, too long for the default suite."""

BACKENDS = [
    "aot_eager",
    pytest.param("inductor", marks=[
        pytest.mark.slow,
        pytest.mark.skipif(os.environ.get(INDUCTOR_ENV) != "1", reason=f"{INDUCTOR_ENV}=1 runs it (minutes)"),
        pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler"),
    ]),
]
"""``aot_eager`` runs dynamo's capture and AOT autograd's joint graph (the graph breaks and tracing
errors), not inductor's code; ``inductor`` is what ``train.compile`` runs."""


@pytest.fixture(scope="module")
def batch() -> Batch:
    return synthetic_batch(2, H, W)


def fresh(name: str, cfg: Config | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_branch(name, cfg or Config()).train()


def step(branch: torch.nn.Module, batch: Batch, precision: str = "no") -> tuple[torch.Tensor, dict, dict]:
    """(loss, terms, gradients by parameter name) of one step; augmentation and held-out draws seeded."""
    torch.manual_seed(1)
    with autocast_factory(precision, torch.device("cpu"))():
        prediction = branch(batch)
    loss, terms = branch.loss(batch, prediction, None, step=0)
    loss.backward()
    grads = {k: p.grad for k, p in branch.named_parameters() if p.grad is not None}
    return loss.detach(), terms, grads


def assert_same_step(reference: tuple, value: tuple, rtol: float) -> None:
    """Loss and terms within ``rtol``; each parameter's gradient within ``rtol`` of its own largest entry."""
    torch.testing.assert_close(value[0], reference[0], rtol=rtol, atol=0)
    for key, term in reference[1].items():
        torch.testing.assert_close(value[1][key], term, rtol=rtol, atol=1e-7, msg=key)
    assert value[2].keys() == reference[2].keys()
    for key, grad in reference[2].items():
        torch.testing.assert_close(value[2][key], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=key)


def test_channels_last_s_step_equals_the_default(batch: Batch) -> None:
    reference = step(fresh("S"), batch)
    branch = fresh("S")
    use_channels_last(branch)
    assert branch.depth_net.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_step(reference, step(branch, batch), rtol=1e-4)


def test_channels_last_u_step_is_close_to_the_default(batch: Batch) -> None:
    """U's photometric loss picks a source and a mask per pixel: float reorderings of the
    convolutions flip a few near-ties, so loss and gradient agree to ~1e-3, not to rounding. The
    pose net starts off the identity: at exactly zero motion every automask comparison is a tie."""
    branches = []
    for channels_last in (False, True):
        branch = fresh("U")
        torch.nn.init.normal_(branch.pose_net.head[-1].weight, std=1e-3)
        if channels_last:
            use_channels_last(branch)
        branches.append(branch)
    (loss0, _, grads0), (loss1, terms1, grads1) = (step(b, batch) for b in branches)
    assert branches[1].pose_net.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss1, loss0, rtol=2e-3, atol=0)
    assert all(torch.isfinite(v) for v in terms1.values())
    flat0, flat1 = (torch.cat([g[k].flatten() for k in grads0]) for g in (grads0, grads1))
    assert grads1.keys() == grads0.keys() and torch.isfinite(flat1).all()
    assert (flat1 - flat0).norm() < 1e-2 * flat0.norm()


@pytest.mark.parametrize("name", ["S", "U"])
def test_bf16_channels_last_step_is_finite(batch: Batch, name: str) -> None:
    """``train.mixed_precision=bf16`` (the trainer's autocast) with channels-last networks."""
    branch = fresh(name)
    use_channels_last(branch)
    torch.manual_seed(1)
    with autocast_factory("bf16", torch.device("cpu"))():
        prediction = branch(batch)
    assert prediction.extras["disp"][0].dtype == torch.bfloat16  # the networks did run in bf16
    loss, terms = branch.loss(batch, prediction, None, step=0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in branch.parameters() if p.grad is not None)


def test_channels_last_weights_are_written_contiguous_under_the_same_names(tmp_path: Path) -> None:
    """safetensors refuses non-contiguous tensors: the export (and checkpoint) writes them contiguous."""
    branch = fresh("U")
    use_channels_last(branch)
    export_branches(tmp_path, {"U": branch})
    saved = load_file(str(tmp_path / "export" / "U.safetensors"))
    state = branch.state_dict()
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_s_step_equals_eager(batch: Batch, backend: str) -> None:
    """The depth net compiled in place: the same step, and the same parameter names (no
    ``_orig_mod.``), so checkpoints and exports are unchanged."""
    torch._dynamo.reset()
    try:
        reference = step(fresh("S"), batch)
        branch = fresh("S")
        keys = list(branch.state_dict())
        compile_networks(branch, backend=backend)
        assert list(branch.state_dict()) == keys
        assert_same_step(reference, step(branch, batch), rtol=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_s_losses_give_the_eager_step(batch: Batch, backend: str) -> None:
    """``train.compile: losses`` on S: its LiDAR NLL and point filtering compiled, the same step."""
    torch._dynamo.reset()
    try:
        reference = step(fresh("S"), batch)
        branch = fresh("S")
        compile_losses(branch, backend=backend)
        assert all(getattr(branch, k) is not getattr(type(branch), k) for k in branch.loss_kernels)
        assert_same_step(reference, step(branch, batch), rtol=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_u_losses_give_the_eager_step(batch: Batch, backend: str) -> None:
    """``train.compile: losses`` on U: the photometric error (SSIM, per-pixel minimum, auto-mask),
    its confidence NLL and the smoothness compiled. Fused kernels round differently, which flips a
    few auto-mask near-ties, hence the tolerances of the channels-last test; the pose net starts
    off the identity, where every auto-mask comparison would be a tie."""
    torch._dynamo.reset()
    try:
        branches = []
        for compiled in (False, True):
            branch = fresh("U")
            torch.nn.init.normal_(branch.pose_net.head[-1].weight, std=1e-3)
            if compiled:
                compile_losses(branch, backend=backend)
            branches.append(branch)
        (loss0, terms0, grads0), (loss1, terms1, grads1) = (step(b, batch) for b in branches)
        assert set(branches[1].loss_kernels) == {"photometric", "identity_error", "self_confidence_nll", "smoothness"}
        assert all(getattr(branches[1], k) is not getattr(type(branches[1]), k) for k in branches[1].loss_kernels)
        torch.testing.assert_close(loss1, loss0, rtol=2e-3, atol=0)
        torch.testing.assert_close(terms1["smooth"], terms0["smooth"], rtol=1e-4, atol=0)
        flat0, flat1 = (torch.cat([g[k].flatten() for k in grads0]) for g in (grads0, grads1))
        assert grads1.keys() == grads0.keys() and torch.isfinite(flat1).all()
        assert (flat1 - flat0).norm() < 1e-2 * flat0.norm()
        assert loss1 != 0 and not torch.equal(flat1, torch.zeros_like(flat1))
    finally:
        torch._dynamo.reset()


def test_compiled_losses_of_both_branches_stay_compiled(batch: Batch) -> None:
    """Dynamo keeps compiled graphs per code object, at most ``recompile_limit`` each, and past it
    runs the function eager without an error. Every ``fp32`` loss shares the decorator's code, so
    compiling the decorated functions put U's and S's graphs in one cache (U alone fills 7: smoothness
    at 4 scales). Here a limit of 4 (smoothness's own 4 scales) is made an error, and a step of each
    branch must stay within it."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            for name in ("U", "S"):
                branch = fresh(name)
                compile_losses(branch, backend="eager")
                loss, _, _ = step(branch, batch)
                assert torch.isfinite(loss)
    finally:
        torch._dynamo.reset()


def test_build_branch_states_applies_the_switches() -> None:
    """The trainer's construction: channels-last weights, compiled networks, optimiser over the same
    parameters (nothing is compiled until the first call)."""
    cfg = Config()
    cfg.branches = ("U",)
    cfg.train.channels_last, cfg.train.compile = True, "on"
    (state,) = build_branch_states(cfg, ("U",), torch.device("cpu")).values()
    for net in (state.model.depth_net, state.model.pose_net):
        assert net._compiled_call_impl is not None
        assert net.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(getattr(state.model, k) is not getattr(type(state.model), k) for k in state.model.loss_kernels)
    optimised = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in state.model.parameters()}
    plain = apply_speed_switches(fresh("S"), TrainConfig())
    assert plain.depth_net._compiled_call_impl is None and plain.memory_format == torch.contiguous_format
    assert all(getattr(plain, k) is getattr(type(plain), k) for k in plain.loss_kernels)
    losses_only = apply_speed_switches(fresh("U"), TrainConfig(compile="losses"))
    assert losses_only.depth_net._compiled_call_impl is None and losses_only.pose_net._compiled_call_impl is None
    assert all(getattr(losses_only, k) is not getattr(type(losses_only), k) for k in losses_only.loss_kernels)
