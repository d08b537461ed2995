"""DeepSpeed ZeRO-1/2 per branch group (``train.deepspeed``): each group gets its own engine.

The engine is told its data-parallel group through an ``mpu`` object, so ZeRO shards the
optimiser state (stage 1) and gradients (stage 2) over the branch's own ranks only, and its
gradient reduction never crosses to the other group. The engine wraps our own AdamW and LambdaLR
(the DDP path's optimiser and schedule), steps them at the accumulation boundary and clips with
the same rule, so a ZeRO run follows the DDP run's losses up to round-off
(``tests/train/test_deepspeed.py``).

Runs on CUDA (NCCL) and on CPU (gloo, ``DS_ACCELERATOR=cpu``): :func:`prepare_deepspeed` makes
DeepSpeed usable on this process's device before anything builds an engine.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distill_depth.config import Config


class DeepSpeedUnavailable(ValueError):
    """``train.deepspeed`` was asked for where it cannot run."""


def prepare_deepspeed(cfg: Config, device: torch.device) -> None:
    """Make DeepSpeed importable and usable on ``device`` for ``cfg``, or raise
    :class:`DeepSpeedUnavailable` (one line). Call before the first ``import deepspeed`` of the
    process."""
    stage = cfg.train.deepspeed
    check_precision(cfg)
    if device.type not in ("cuda", "cpu"):
        raise DeepSpeedUnavailable(f"train.deepspeed={stage} runs on CUDA or CPU, not on {device}; "
                                   "use train.deepspeed=none")
    if device.type == "cpu":
        # DeepSpeed picks its accelerator once, at import: say CPU rather than let it probe.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401, PLC0415
        from deepspeed.accelerator import get_accelerator  # noqa: PLC0415
    except ImportError as exc:
        raise DeepSpeedUnavailable(f"train.deepspeed={stage} needs the deepspeed package ({exc}); "
                                   "pip install deepspeed, or use train.deepspeed=none") from None
    except (RuntimeError, OSError) as exc:  # a broken install (missing libraries, wrong torch)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeepSpeedUnavailable(f"train.deepspeed={stage}: deepspeed does not import ({first}); "
                                   "use train.deepspeed=none") from None
    accelerator = get_accelerator().device_name()
    if accelerator != device.type:
        raise DeepSpeedUnavailable(f"train.deepspeed={stage}: DeepSpeed's accelerator is {accelerator!r} but this "
                                   f"process runs on {device} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); "
                                   "unset DS_ACCELERATOR or use train.deepspeed=none")
    if device.type == "cpu":
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce with g++ when
        # it starts (~25 s per process, fails without a compiler). That op serves only
        # DeepSpeed's inference all-reduce; the engines' collectives go through torch.distributed
        # (gloo) groups either way, so it is not built.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def check_precision(cfg: Config) -> None:
    """``train.mixed_precision`` under an engine: ``no`` and ``bf16`` as on the DDP path; ``fp16``
    has no DeepSpeed counterpart of the DDP path's (autocast over fp32 weights with a GradScaler)."""
    if cfg.train.mixed_precision == "fp16":
        raise DeepSpeedUnavailable(
            f"train.deepspeed={cfg.train.deepspeed} with train.mixed_precision=fp16: DeepSpeed's fp16 mode holds fp16 "
            "weights (and is not supported on CPU), and its fp32 ZeRO engine has no loss scaler; use "
            "train.mixed_precision=bf16 or no, or train.deepspeed=none")


def deepspeed_config(cfg: Config, micro_batch: int, group_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one branch group (``micro_batch`` samples per rank per micro-step).

    No ``optimizer`` / ``scheduler`` section: :func:`build_engine` passes the DDP path's torch
    AdamW (on ZeRO's supported list) and LambdaLR, which the engine steps at the accumulation
    boundary. The engine holds fp32 weights and gradients in every precision: the loop autocasts
    the forward (``bf16``) exactly as on the DDP path, so neither DeepSpeed's bf16 mode (bf16
    weights, bf16 gradient reduction) nor its loss scaling is used; an fp32 ZeRO optimiser applies
    no loss scale (it asserts 1.0)."""
    check_precision(cfg)
    stage = {"zero1": 1, "zero2": 2}.get(cfg.train.deepspeed)
    if stage is None:
        raise DeepSpeedUnavailable(f"train.deepspeed={cfg.train.deepspeed!r} is not zero1 or zero2")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro_batch * cfg.train.grad_accum * group_size,
        # the DDP path's rule: grads × max_norm / (norm + 1e-6) when the group-wide norm exceeds it
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
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


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs torch.distributed even in a single process (which accelerate leaves
    without a group): a one-rank group over an in-memory store, nothing to connect to; and the
    ``LOCAL_RANK`` a launcher would set (DeepSpeed asserts it)."""
    if not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)


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
    load_safely(engine)
    return engine, ds_optimizer, ds_scheduler


def load_safely(engine: Any) -> None:
    """The engine reads its checkpoint files as the trainer reads its own ``.pt`` files.

    DeepSpeed loads them with ``torch.load(weights_only=False)``, so a pickled object in a
    checkpoint would run code. Its ZeRO-1/2 files hold tensors, plain containers and exactly three
    DeepSpeed types (the loss scaler's attributes, the stage enum, fragment addresses): those are
    allowed, anything else is refused (:class:`CheckpointCorrupt`, naming the file)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    from distill_depth.train.checkpoint import load_plain  # noqa: PLC0415

    allowed = (LossScaler, ZeroStageEnum, fragment_address)

    def load(path: str, map_location: Any = None) -> Any:
        return load_plain(path, map_location, allowed)

    engine.checkpoint_engine.load = load
