"""Typed experiment configuration: one dataclass per section, YAML files, dotted overrides.

A config is built in three layers, later ones winning:
  1. the dataclass defaults (``distill_depth.config.schema``: every key, documented),
  2. a YAML file (``configs/*.yaml``; a file may name ``base: other.yaml`` to inherit),
  3. dotted command-line overrides (``optim.lr=1e-4 data.train_shards=shards/train``).
Unknown keys are an error that names the key, so a typo never silently does nothing.
"""

from distill_depth.config.loading import config_from_dict, load_config, parse_override, save_config, validate
from distill_depth.config.schema import (
    BUNDLED_SHARDS,
    REPO_ROOT,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TopologyConfig,
    TrainConfig,
)

__all__ = [
    "BUNDLED_SHARDS", "REPO_ROOT", "AugmentConfig", "Config", "ConfigError", "DataConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "TopologyConfig", "TrainConfig", "config_from_dict", "load_config",
    "parse_override", "save_config", "validate",
]
