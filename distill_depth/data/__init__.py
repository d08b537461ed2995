"""KITTI raw data → WebDataset shards → training / evaluation streams.

``resolve_shards``, ``TrainStream`` and ``eval_batches`` are imported lazily so that the
data-preparation commands start without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShardSet", "ShardError", "TrainStream", "eval_batches", "resolve_shards"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distill_depth.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'distill_depth.data' has no attribute {name!r}")
