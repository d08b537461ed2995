"""DeepSpeed: the generated per-group config is valid for DeepSpeed's own parser (CPU: no engine)."""

from __future__ import annotations

import pytest
import torch

from distill_depth.config import load_config
from distill_depth.train.deepspeed import (
    DeepSpeedUnavailable, check_deepspeed_config, deepspeed_config, require_deepspeed_device,
)


@pytest.mark.parametrize("stage, precision", [("zero1", "bf16"), ("zero2", "fp16"), ("zero2", "no")])
def test_generated_config_is_accepted(stage: str, precision: str) -> None:
    cfg = load_config(None, [f"train.deepspeed={stage}", f"train.mixed_precision='{precision}'", "train.grad_accum=2",
                             "optim.grad_clip=1.0"])
    config = deepspeed_config(cfg, micro_batch=4, group_size=1)
    check_deepspeed_config(config)
    assert config["zero_optimization"]["stage"] == {"zero1": 1, "zero2": 2}[stage]
    assert config["train_batch_size"] == 8


def test_wrong_batch_product_is_rejected() -> None:
    config = deepspeed_config(load_config(None, ["train.deepspeed=zero2"]), micro_batch=4, group_size=1)
    config["train_batch_size"] = 6
    with pytest.raises(AssertionError):
        check_deepspeed_config(config)


def test_cpu_is_refused_with_a_clear_message() -> None:
    with pytest.raises(DeepSpeedUnavailable, match="train.deepspeed=none"):
        require_deepspeed_device(torch.device("cpu"))
