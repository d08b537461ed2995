"""DeepSpeed ZeRO-1/2 per branch group (``train.deepspeed``): each group gets its own engine.

The engine is told its data-parallel group through an ``mpu`` object, so ZeRO shards the
optimiser state (stage 1) and gradients (stage 2) over the branch's own ranks only, and its
gradient reduction never crosses to the other group. GPU only: DeepSpeed's CPU path needs the
accelerator's process start (see TOOLCHAIN), which the per-group design does not use; on CPU the
generated config is still checked with ``DeepSpeedConfig``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distill_depth.config import Config


class DeepSpeedUnavailable(ValueError):
    """``train.deepspeed`` was asked for where it cannot run."""


def require_deepspeed_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise DeepSpeedUnavailable(
            f"train.deepspeed needs CUDA GPUs (this process runs on {device}); use train.deepspeed=none on CPU"
        )


def deepspeed_config(cfg: Config, micro_batch: int, group_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one branch group (``micro_batch`` samples per rank per micro-step)."""
    stage = {"zero1": 1, "zero2": 2}.get(cfg.train.deepspeed)
    if stage is None:
        raise DeepSpeedUnavailable(f"train.deepspeed={cfg.train.deepspeed!r} is not zero1 or zero2")
    precision = cfg.train.mixed_precision
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro_batch * cfg.train.grad_accum * group_size,
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Validate with DeepSpeed's own parser (needs no process group; rejects unknown keys and a
    batch product that does not add up)."""
    from deepspeed.runtime.config import DeepSpeedConfig  # noqa: PLC0415

    DeepSpeedConfig(dict(config))


class GroupMPU:
    """The ``mpu`` interface DeepSpeed reads: data parallel = the branch group, no model parallel."""

    def __init__(self, group: dist.ProcessGroup | None, group_ranks: tuple[int, ...], self_group: Any, rank: int):
        self._group, self._ranks, self._self_group, self._rank = group, list(group_ranks), self_group, rank

    def get_data_parallel_group(self) -> Any:
        return self._group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self._ranks

    def get_data_parallel_rank(self) -> int:
        return self._ranks.index(self._rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self._ranks)

    def get_model_parallel_group(self) -> Any:
        return self._self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


def single_rank_groups(world: int) -> list[Any]:
    """One group per rank (DeepSpeed's trivial model-parallel groups); every rank creates all."""
    return [dist.new_group([r]) for r in range(world)]


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any],
                 mpu: GroupMPU) -> tuple[Any, Any, Any]:
    """(engine, optimizer, scheduler) of one branch over its group."""
    import deepspeed  # noqa: PLC0415

    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=mpu
    )
    return engine, ds_optimizer, ds_scheduler
