"""Loss-path benchmark: branch U's photometric loss (forward + backward) by the formulas replaced in
issue 13 vs the current ones, alternating in one run, same inputs.

    .venv/bin/python benchmarks/photometric_loss.py [--batch-size 4] [--height 96] [--width 320]
        [--sources 2] [--scales 4] [--steps 10] [--warmup 3]

Old: kornia's SSIM, per-pixel minimum by argmin + gather, identity error recomputed at every scale.
New: ``photometric`` with ``identity_error`` computed once per batch. Prints medians and new/old.
The ``reference_*`` functions are the old formulas; tests/losses/test_photometric_rewrite.py checks
the new ones against them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import kornia
import torch
from torch import Tensor

from distill_depth.losses import identity_error, photometric
from distill_depth.losses.photometric import LARGE_ERROR


def reference_photometric_error(a: Tensor, b: Tensor, alpha: float = 0.85) -> Tensor:
    """The replaced pe(a, b): kornia's Gaussian 3×3 SSIM, finite inputs only. (B, 3, H, W) → (B, 1, H, W)."""
    ssim = kornia.metrics.ssim(a, b, window_size=3, max_val=1.0)
    dssim = ((1.0 - ssim) / 2.0).clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    return alpha * dssim + (1.0 - alpha) * (a - b).abs().mean(dim=1, keepdim=True)


def reference_photometric(
    target: Tensor, warped: Sequence[Tensor], valid: Sequence[Tensor], sources: Sequence[Tensor], alpha: float = 0.85
) -> tuple[Tensor, Tensor]:
    """The replaced per-pixel minimum: argmin + gather, identity error recomputed per call."""
    errors = torch.cat([reference_photometric_error(target, w, alpha) for w in warped], dim=1)
    invalid = ~torch.cat(list(valid), dim=1)
    choice = (errors + LARGE_ERROR * invalid.float()).detach().argmin(dim=1, keepdim=True)
    pe_min = errors.gather(1, choice)
    mask = pe_min < LARGE_ERROR
    identity = torch.cat([reference_photometric_error(target, s, alpha) for s in sources], dim=1)
    mask = mask & (pe_min < identity.min(dim=1, keepdim=True).values)
    return torch.where(mask, pe_min, torch.zeros_like(pe_min)), mask


def _median_seconds(fn: Callable[[], None], other: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
        other()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for i, f in enumerate((fn, other)):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("batch-size", 4), ("height", 96), ("width", 320), ("sources", 2), ("scales", 4),
                          ("steps", 10), ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.height, args.width)
    target = torch.rand(shape, generator=gen)
    sources = [torch.rand(shape, generator=gen) for _ in range(args.sources)]
    valid = [torch.rand(args.batch_size, 1, args.height, args.width, generator=gen) > 0.1 for _ in sources]

    def warped_per_scale() -> list[list[Tensor]]:
        return [[(0.5 * target + 0.5 * s).requires_grad_(True) for s in sources] for _ in range(args.scales)]

    def old() -> None:
        sum(reference_photometric(target, w, valid, sources)[0].mean() for w in warped_per_scale()).backward()

    def new() -> None:
        identity = identity_error(target, sources)
        sum(photometric(target, w, valid, identity=identity)[0].mean() for w in warped_per_scale()).backward()

    t_old, t_new = _median_seconds(old, new, args.steps, args.warmup)
    print(
        f"photometric loss fwd+bwd, batch {args.batch_size} {args.width}x{args.height}, {args.sources} sources x "
        f"{args.scales} scales, {torch.get_num_threads()} threads, median of {args.steps}: "
        f"old {t_old * 1e3:.1f} ms, new {t_new * 1e3:.1f} ms, new/old {t_new / t_old:.2f}"
    )


if __name__ == "__main__":
    main()
