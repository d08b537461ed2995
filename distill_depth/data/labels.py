"""Which training samples keep their LiDAR: the semi-supervised label subset.

A sample is labelled when its shards carry ``depth.png`` (``make-shards --keep-unlabelled`` writes
frames without a scan as ``"labelled": false``) and, for ``data.labelled_fraction < 1``, when a
hash of ``(label_seed, key)`` falls below the fraction. The hash depends on nothing but the key, so
the subset is the same on every rank, every worker, after a resume and for any world size.
"""

from __future__ import annotations

import hashlib

__all__ = ["in_label_subset"]


def in_label_subset(key: str, fraction: float, seed: int = 0) -> bool:
    """True when sample ``key`` belongs to the labelled ``fraction`` chosen by ``seed``.

    The first 8 bytes of sha256(``"{seed}:{key}"``) read as a number in [0, 1): uniform over keys,
    so about ``fraction`` of any large set of keys is chosen, and a larger fraction (same seed)
    keeps every sample a smaller one chose.
    """
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
