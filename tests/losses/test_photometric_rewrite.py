"""The rewritten loss path (issue 13) equals the formulas it replaced, on random inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import kornia
import pytest
import torch

from distill_depth.losses import identity_error, photometric, photometric_error, ssim_map

# the old formulas live beside the benchmark that times them against the new ones
_SPEC = importlib.util.spec_from_file_location(
    "photometric_loss", Path(__file__).resolve().parents[2] / "benchmarks" / "photometric_loss.py"
)
_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_bench)
_old_photometric_error = _bench.reference_photometric_error
_old_photometric = _bench.reference_photometric


@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 1, 5, 4), (3, 3, 96, 320)])
def test_ssim_map_equals_kornia(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    a, b = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    b = 0.5 * a + 0.5 * b  # correlated, so SSIM spans a useful range, not only ~0
    ours, ref = ssim_map(a, b), kornia.metrics.ssim(a, b, window_size=3, max_val=1.0)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 2e-6
    assert ref.std().item() > 0.05  # the comparison is not between two constants


def test_photometric_error_equals_old_formula_and_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 24, 40, generator=gen)
    b = torch.rand(2, 3, 24, 40, generator=gen).requires_grad_(True)
    new = photometric_error(a, b)
    old = _old_photometric_error(a, b)
    assert (new - old).abs().max().item() < 2e-6
    (grad_new,) = torch.autograd.grad(new.sum(), b)
    (grad_old,) = torch.autograd.grad(old.sum(), b)
    assert (grad_new - grad_old).abs().max().item() < 1e-5


@pytest.mark.parametrize("num_sources", [1, 2, 3])
def test_photometric_min_and_automask_equal_argmin_formula(num_sources: int) -> None:
    gen = torch.Generator().manual_seed(10 + num_sources)
    shape = (2, 3, 20, 30)
    target = torch.rand(shape, generator=gen)
    warped = [(0.6 * target + 0.4 * torch.rand(shape, generator=gen)).requires_grad_(True) for _ in range(num_sources)]
    valid = [torch.rand(2, 1, 20, 30, generator=gen) > 0.3 for _ in range(num_sources)]
    sources = [0.5 * target + 0.5 * torch.rand(shape, generator=gen) for _ in range(num_sources)]
    old_pe, old_mask = _old_photometric(target, warped, valid, sources)
    identity = identity_error(target, sources)
    # the old formula's fp32 rounding of e + 1e4 only matters where no source is valid (below)
    some_valid = torch.stack(valid).any(dim=0)
    for new_pe, new_mask in (
        photometric(target, warped, valid, sources=sources),
        photometric(target, warped, valid, identity=identity),
    ):
        assert torch.equal(new_mask & some_valid, old_mask & some_valid)
        assert (new_pe - old_pe)[some_valid].abs().max().item() < 2e-6
        grads_new = torch.autograd.grad((new_pe * some_valid).sum(), warped)
        grads_old = torch.autograd.grad((old_pe * some_valid).sum(), warped, retain_graph=True)
        for g_new, g_old in zip(grads_new, grads_old):
            assert (g_new - g_old).abs().max().item() < 1e-5
    none_valid = ~torch.stack(valid).any(dim=0)
    assert none_valid.any()  # the random masks cover the "no valid source" case too
    errors = torch.stack([photometric_error(target, w) for w in warped]).amin(dim=0)
    pe_all, _ = photometric(target, warped, valid)  # no auto-mask: every finite pixel kept
    # where no source is valid the new minimum is the exact one; the old argmin over e + 1e4 in
    # fp32 could pick a source up to one ulp of 1e4 (~1e-3) worse
    assert (pe_all[none_valid] - errors[none_valid]).abs().max().item() < 1e-7
    assert 0.05 < old_mask.float().mean().item() < 0.95  # the auto-mask is neither empty nor full


def test_identity_error_carries_no_graph() -> None:
    target = torch.rand(1, 3, 8, 8)
    source = torch.rand(1, 3, 8, 8, requires_grad=True)
    assert not identity_error(target, [source]).requires_grad
