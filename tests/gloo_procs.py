"""Real gloo process groups for tests: ``run_gloo(worker, world, store)`` spawns ``world``
processes that call ``worker(rank, world, store, queue)`` and put ``(rank, result)`` on the queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def run_gloo(worker: Callable[..., None], world: int, store: Path, timeout: float = 180) -> dict[int, Any]:
    """Every rank's result, after every process exited 0 (``store``: the file of the file:// rendezvous)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, world, str(store), queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return results
