"""The real trainer's step on in-memory batches: what ``gpu_check.py`` and ``vs_monodepth2.py`` time.

:func:`in_memory_trainer` builds :class:`distill_depth.train.loop.Trainer` (placement, branches
with their optimisers and schedules, speed switches, DeepSpeed engines, autocast) exactly as
``distill-depth train`` does, except that its batch source repeats one batch that already lies on
the device (no shards, no loader, no host-to-device copy: the step alone is timed) and the shard
checks at the door are skipped. :func:`timed_step` is one ``Trainer.train_step`` (forward of each
branch, exchange, losses, backward, optimiser steps) up to the device's synchronisation.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout runs without ``pip install -e .``
    sys.path.insert(0, str(REPO))

BENCH_OVERRIDES = [
    "data.val_shards=null", "data.num_workers=0", "train.max_steps=1000000", "train.log_every=1000000",
    "train.val_every=0", "train.image_every=0", "train.ckpt_every=0", "train.report_to=none",
    "train.resume=none", "train.timeout_s=3600", "optim.warmup_steps=0", "optim.schedule=constant",
]
"""What every benchmark trainer shares: no validation, images, checkpoints or tracker during
the timed steps, and a schedule that does not move within them."""


class FixedSource:
    """A ``BatchSource`` stand-in: the given batches in turn, for ever (its position never moves)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.count = batches, 0
        self.position = None

    def next(self) -> Any:
        batch = self.batches[self.count % len(self.batches)]
        self.count += 1
        return batch

    def close(self) -> None:
        pass


def random_batch(batch_size: int, height: int, width: int, device: Any, seed: int = 0) -> Any:
    """A ``Batch`` of smooth random frames (t, t-1, t+1 shifted by a few pixels), ~5 % LiDAR
    pixels at 2-80 m and KITTI-like intrinsics (Monodepth2's normalised K), on ``device``."""
    import torch
    import torch.nn.functional as F

    from distill_depth.types import Batch

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, max(height // 8, 2), max(width // 8, 2), generator=g)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    image = (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)
    shift = max(width // 80, 1)
    sources = {"prev": image.roll(shift, dims=-1), "next": image.roll(-shift, dims=-1)}
    hit = torch.rand(batch_size, 1, height, width, generator=g) < 0.05
    sparse = torch.where(hit, 2 + 78 * torch.rand(hit.shape, generator=g), torch.zeros(()))
    K = torch.tensor([[0.58 * width, 0, 0.5 * width], [0, 1.92 * height, 0.5 * height], [0, 0, 1]])
    batch = Batch(image=image, sources=sources, sparse_depth=sparse, K=K.expand(batch_size, 3, 3).clone(),
                  keys=[f"bench_l_{i:010d}" for i in range(batch_size)])
    return batch.to(device)


@contextlib.contextmanager
def in_memory_trainer(overrides: list[str], batch: Any, config: str | Path | None = None) -> Iterator[Any]:
    """A ``Trainer`` built from ``config`` (a YAML file; None: the defaults) with
    ``BENCH_OVERRIDES + overrides``, whose stream is ``batch`` (or a list of batches, in turn), in
    a temporary run folder; closed on exit."""
    from distill_depth.config import load_config
    from distill_depth.train import loop
    from distill_depth.train.signals import StopRequest

    class InMemoryTrainer(loop.Trainer):
        def _build_stream(self) -> None:
            self.source = FixedSource(batch if isinstance(batch, list) else [batch])

    with tempfile.TemporaryDirectory(prefix="dd_bench_run_") as out:
        cfg = load_config(config, [*BENCH_OVERRIDES, *overrides, f"train.output_dir={out}"])
        quiet_bar = lambda enabled, initial, total: real_bar(False, initial, total)  # noqa: E731
        real_bar = loop.progress_bar
        with mock.patch.object(loop, "checked_at_the_door", return_value=None), \
                mock.patch.object(loop, "progress_bar", quiet_bar):
            trainer = InMemoryTrainer(cfg, StopRequest())
        try:
            yield trainer
        finally:
            trainer.close()
            del trainer


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Any) -> float:
    """Seconds of one ``Trainer.train_step`` (including the device's synchronisation)."""
    sync(trainer.device)
    t0 = time.perf_counter()
    trainer.train_step()
    sync(trainer.device)
    return time.perf_counter() - t0


def release_device_memory() -> None:
    """Free what the last trainer left (compiled graphs, cached blocks) before the next one."""
    import gc

    import torch

    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
