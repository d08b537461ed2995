"""Exact distributed evaluation: every rank evaluates its own share, rank 0 gathers the records.

Works under ``torchrun`` / ``accelerate launch --multi_gpu`` (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and under ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``). The
stream gives each sample to exactly one rank, so nothing is padded or counted twice.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ProcessInfo:
    rank: int
    world: int
    device: torch.device
    started_group: bool
    """True when this module started the process group (and so must destroy it)."""


def _slurm_env() -> None:
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def start(timeout_s: float = 600.0) -> ProcessInfo:
    """Join the launcher's process group when there is more than one process."""
    _slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return ProcessInfo(0, 1, device, False)
    started = False
    if not dist.is_initialized():
        # gloo even on GPU: only small Python objects are gathered.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        started = True
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), device, started)


def gather_records(records: list[dict], info: ProcessInfo) -> list[dict] | None:
    """All ranks' records on rank 0 (None elsewhere); a single process returns its own."""
    if info.world == 1:
        return records
    gathered: list[list[dict]] | None = [None] * info.world if info.rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(records, gathered, dst=0)
    if info.rank != 0:
        return None
    return [r for part in gathered for r in part]  # type: ignore[union-attr]


def barrier(info: ProcessInfo) -> None:
    if info.world > 1:
        dist.barrier()


def finish(info: ProcessInfo) -> None:
    if info.started_group and dist.is_initialized():
        dist.destroy_process_group()
