"""Building a :class:`Config`: YAML files (``base:`` inheritance), dotted overrides, typing of
every value against the schema, cross-field checks, and writing a config back out."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from distill_depth.config.schema import Config, ConfigError


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: cannot read {value!r} as {hint} ({'; '.join(errors)})")
    if origin is Literal:
        value = _as_typed_literal(value, args)
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if hint is float else int(str(value), 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _as_typed_literal(value: Any, choices: tuple[Any, ...]) -> Any:
    """The choice the user typed when YAML read it as something else.

    YAML 1.1 reads a bare ``on``/``off``/``yes``/``no`` as a boolean (and ``1e3`` style words as
    numbers): ``loss.scale_align=on`` arrives as ``True``. A value that is not a choice itself but
    is what YAML makes of exactly one choice's text is that choice, for every enum key at once.
    """
    if value in choices:
        return value
    readings = [c for c in choices if isinstance(c, str) and _yaml_reading(c) == value
                and type(_yaml_reading(c)) is type(value)]
    return readings[0] if len(readings) == 1 else value


def _yaml_reading(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


DEPRECATED_KEYS = {"data.use_stereo": "data.u_sources"}
"""Old key → its replacement; the old key is still read (with a warning) for one release."""


def _migrate_use_stereo(dotted: str, value: Any) -> tuple[str, Any]:
    """``data.use_stereo`` (bool) → ``data.u_sources`` (true: temporal+stereo, false: temporal)."""
    flag = _coerce(value, bool, dotted)
    new = "temporal+stereo" if flag else "temporal"
    warnings.warn(
        f"config key {dotted}={value!r} is deprecated: use data.u_sources={new} "
        "(temporal | stereo | temporal+stereo); it will be removed in the next release",
        FutureWarning,  # shown by default: the reader is a user with an old config, not a developer
        stacklevel=4,
    )
    return "data.u_sources", new


def _set(cfg: Any, dotted: str, value: Any) -> None:
    if dotted in DEPRECATED_KEYS:
        dotted, value = _migrate_use_stereo(dotted, value)
    parts = dotted.split(".")
    node = cfg
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{'.'.join(parts[:i])} has no sub-keys (while setting {dotted})")
        fields = {f.name: f for f in dataclasses.fields(node)}
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {dotted!r} (known at this level: {known})")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(node))
            if dataclasses.is_dataclass(getattr(node, name)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
                for sub_key, sub_value in value.items():
                    _set(cfg, f"{dotted}.{sub_key}", sub_value)
            else:
                setattr(node, name, _coerce(value, hints[name], dotted))
        else:
            node = getattr(node, name)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    flat: dict[str, Any] = {}
    base = content.pop("base", None)
    if base is not None:
        flat.update(_read_yaml((path.parent / base), seen + (path.resolve(),)))
    flat.update(_flatten(content))
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` → ``("optim.lr", 1e-4)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (with ``base:`` inheritance) ← dotted ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        for key, value in _read_yaml(Path(path)).items():
            _set(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a saved ``config.yaml``)."""
    cfg = Config()
    for key, value in _flatten(mapping).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field typing cannot express."""
    if not set(cfg.branches) or not set(cfg.branches) <= {"S", "U"}:
        raise ConfigError(f"branches: expected a non-empty subset of [S, U], got {list(cfg.branches)}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if not 0.0 <= cfg.data.labelled_fraction <= 1.0:
        raise ConfigError(f"data.labelled_fraction must be in [0, 1], got {cfg.data.labelled_fraction}")
    if cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    if cfg.train.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {cfg.train.max_bad_steps}")
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}")
    if not 0.0 <= cfg.loss.pf_fraction < 1.0:
        raise ConfigError(f"loss.pf_fraction (M) must be in [0, 1), got {cfg.loss.pf_fraction}")
    if not 0 < cfg.model.min_depth < cfg.model.max_depth:
        raise ConfigError(
            f"model.min_depth/max_depth must satisfy 0 < min < max, got {cfg.model.min_depth}, {cfg.model.max_depth}"
        )
    if cfg.model.init_depth is not None and not cfg.model.min_depth < cfg.model.init_depth < cfg.model.max_depth:
        raise ConfigError(
            f"model.init_depth must lie strictly between min_depth and max_depth "
            f"({cfg.model.min_depth}, {cfg.model.max_depth}), got {cfg.model.init_depth}"
        )
    if not cfg.model.pose_translation_scale > 0:
        raise ConfigError(f"model.pose_translation_scale must be > 0, got {cfg.model.pose_translation_scale}")
    if cfg.model.pretrained == "file" and not cfg.model.weights:
        raise ConfigError("model.pretrained is 'file' but model.weights is not set")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
