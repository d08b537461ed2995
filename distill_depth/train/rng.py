"""Randomness of a training run: process seeds, one random stream per branch, isolation of reads.

Each branch replica draws its augmentation and its held-out LiDAR pixels from a stream of its
own, seeded by (``train.seed``, branch name, replica index in the branch's group). So what S draws
does not depend on whether U shares its process, and a run gives the same numbers colocated on
one process as split over an S rank and a U rank. The ablations of the fidelity benchmark rely
on it: S-only, one-way and no-distillation train S on identical random numbers, so they differ
only by the terms that really differ (common random numbers, not noise).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and python generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def stream_seed(seed: int, branch: str, replica: int) -> int:
    """A 63-bit seed of branch ``branch``'s replica ``replica`` (its index in the branch's group)."""
    digest = hashlib.blake2b(f"{seed}/{branch}/{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_state() -> dict[str, Any]:
    """The global torch / cuda / numpy / python generator states of this process, as tensors,
    numbers and strings only (a checkpoint's RNG file loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (or the numpy/python tuples that older checkpoints pickled)."""
    torch.set_rng_state(state["torch"])
    saved_np, saved_py = state["numpy"], state["python"]
    if isinstance(saved_np, dict):
        saved_np = (saved_np["kind"], saved_np["keys"].numpy().astype(np.uint32), saved_np["pos"],
                    saved_np["has_gauss"], saved_np["cached_gaussian"])
    if isinstance(saved_py, dict):
        saved_py = (saved_py["version"], tuple(int(x) for x in saved_py["internal"].tolist()), saved_py["gauss"])
    np.random.set_state(saved_np)
    random.setstate(saved_py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching the global torch/numpy/python RNG streams.

    Reading data (DataLoader iterator creation draws a seed) must not shift the random numbers of
    augmentation and point filtering, or a resumed run would differ from an uninterrupted one.
    """
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


@dataclass
class _Stream:
    seed: int
    cpu: torch.Tensor | None = None
    cuda: torch.Tensor | None = None


class BranchStreams:
    """One torch random stream per local branch; ``use(name)`` makes it the global one for a block.

    The branches draw through torch's global generators (kornia's augmentation does), so a
    stream is swapped in and out around the branch's forward and loss: outside ``use`` the
    process's own generators are untouched. CPU state, plus the CUDA state of ``device``.
    """

    def __init__(self, seed: int, replicas: dict[str, int], device: torch.device) -> None:
        self.device = device
        self._streams = {name: _Stream(stream_seed(seed, name, index)) for name, index in replicas.items()}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        stream = self._streams[name]
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            if stream.cpu is None:
                torch.random.manual_seed(stream.seed)  # the first use: CPU and every CUDA device
            else:
                torch.set_rng_state(stream.cpu)
                if cuda and stream.cuda is not None:
                    torch.cuda.set_rng_state(stream.cuda, self.device)
            yield
            stream.cpu = torch.get_rng_state()
            if cuda:
                stream.cuda = torch.cuda.get_rng_state(self.device)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {"seed": s.seed, "cpu": s.cpu, "cuda": s.cuda} for name, s in self._streams.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore the streams of the branches this rank runs (a branch missing from ``state`` is an error)."""
        missing = sorted(set(self._streams) - set(state))
        if missing:
            raise KeyError(f"no random stream saved for branch(es) {missing}")
        for name, stream in self._streams.items():
            saved = state[name]
            stream.seed, stream.cpu, stream.cuda = int(saved["seed"]), saved["cpu"], saved["cuda"]
