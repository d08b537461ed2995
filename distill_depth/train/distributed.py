"""Process start (torchrun / accelerate / srun), device, per-group DDP, world-wide agreement.

``accelerate`` starts the processes and the default process group (gloo on CPU, NCCL on GPU);
the models are wrapped by hand, each branch in ``DistributedDataParallel`` over its own
group, because ``accelerator.prepare`` always wraps over the whole world.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def env_from_slurm(environ: dict[str, str] | None = None) -> dict[str, str]:
    """torchrun-style variables derived from srun's, when the launcher did not set them.

    Returns the variables it added (also written into ``environ``, default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    added = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
    }
    if "MASTER_ADDR" not in env:
        added["MASTER_ADDR"] = first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
    if "MASTER_PORT" not in env:
        # Same on every task of the job, different between jobs sharing a node.
        added["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    env.update(added)
    return added


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: ``gpu[03-05,07],cpu1`` → ``gpu03``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def init_restarted_group(backend: str, timeout: datetime.timedelta) -> bool:
    """The default process group of a torchrun round after a restart (``--max-restarts``), over keys
    of this round only. Returns whether it started the group (accelerate then keeps it).

    torchrun's agent keeps one store for the whole job and torch 2.14's ``env://`` handler no
    longer prefixes its keys by attempt, so a restarted round reads the dead round's gloo
    addresses and ``init_process_group`` fails ("connectFullMesh ... Connection refused").
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"distill_depth/restart_{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
    return True


def make_accelerator(timeout_s: float) -> Any:
    """``Accelerator`` that starts the process group with our backend and timeout."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    env_from_slurm()
    cpu = not torch.cuda.is_available()
    handler = InitProcessGroupKwargs(
        backend="gloo" if cpu else "nccl", timeout=datetime.timedelta(seconds=float(timeout_s))
    )
    # Mixed precision is applied by the loop (autocast around forward only; losses in fp32),
    # so the accelerator is told "no" and never casts anything itself.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        init_restarted_group(handler.backend, handler.timeout)
    # A backend handler on a single process makes accelerate skip the group init but query it.
    handlers = [handler] if world > 1 else []
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=handlers)
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(
            f"launcher started {world} processes but accelerate sees {accelerator.num_processes}: "
            "on CPU launch with `accelerate launch --multi_gpu --num_processes N` or torchrun, "
            "not `--cpu` (see docs/training.md)"
        )
    return accelerator


def wrap_ddp(module: nn.Module, group: dist.ProcessGroup | None, group_size: int, device: torch.device) -> nn.Module:
    """DDP over ``group`` (the branch's own ranks); unchanged when the group has one rank."""
    if group_size <= 1 or not dist.is_initialized():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, process_group=group, broadcast_buffers=False, find_unused_parameters=True
    )


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) or hasattr(module, "module") else module


def agree_to_stop(local_stop: bool, device: torch.device) -> bool:
    """True on every rank when any rank wants to stop (one small all-reduce per step)."""
    return any_rank(local_stop, device)


def any_rank(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank of ``group`` (default: the world) when ``flag`` is true on any of them."""
    return any_rank_each([flag], device, group)[0]


def any_rank_each(flags: list[bool], device: torch.device, group: dist.ProcessGroup | None = None) -> list[bool]:
    """:func:`any_rank` for several flags in one all-reduce."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(flags)
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return [bool(v > 0) for v in value.tolist()]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RunStopped(Exception):
    """An error that every rank raises together, after agreeing on it: the launcher's command
    prints ``message`` once (``report`` is true on rank 0 only) and exits with ``code``."""

    def __init__(self, message: str, code: int, report: bool) -> None:
        super().__init__(message)
        self.message, self.code, self.report = message, code, report


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (on every rank); a list of one when not distributed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
