"""Config: defaults, YAML with `base:` inheritance, dotted overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_depth.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_defaults_have_the_keys_users_rely_on():
    cfg = Config()
    assert cfg.train.max_steps > 0
    assert cfg.train.output_dir
    assert isinstance(cfg.train.seed, int)
    assert cfg.data.train_shards.endswith("shards/train")
    assert cfg.data.val_shards.endswith("shards/val")
    assert cfg.loss.ssim_alpha == 0.85 and cfg.loss.tau_s == 0.1 and cfg.loss.tau_u == 0.05
    assert cfg.loss.pf_fraction == 0.2 and cfg.loss.lambda_distill == 0.5


def test_yaml_base_and_overrides(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.001\ntrain:\n  max_steps: 7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  seed: 3\nbranches: [S]\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=2e-4", "data.train_shards=/x/{000..003}.tar",
                                                "augment.crop_scale=[0.5,1.0]", "data.val_shards=null"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3
    assert cfg.branches == ("S",)
    assert cfg.data.train_shards == "/x/{000..003}.tar"
    assert cfg.augment.crop_scale == (0.5, 1.0)
    assert cfg.data.val_shards is None


def test_round_trip_through_saved_yaml(tmp_path: Path):
    cfg = load_config(None, ["train.max_steps=11", "loss.point_filtering=prior"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("train.max_steps=abc", "train.max_steps"),
        ("loss.point_filtering=sometimes", "sometimes"),
        ("train.max_steps=0", "train.max_steps"),
        ("noequals", "key=value"),
        ("branches=[S,X]", "branches"),
        ("model.init_depth=200", "model.init_depth"),
        ("model.pose_translation_scale=0", "model.pose_translation_scale"),
    ],
)
def test_bad_overrides_name_the_key(override: str, fragment: str):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_yaml_no_is_the_literal_no():
    cfg = load_config(None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def _enum_keys() -> list[tuple[str, tuple[str, ...]]]:
    """Every Literal-typed key of Config, with its choices (found by reflection, not listed)."""
    import dataclasses
    import typing

    found = []
    for section in dataclasses.fields(Config):
        node = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(node):
            continue
        for name, hint in typing.get_type_hints(type(node)).items():
            if typing.get_origin(hint) is typing.Literal:
                found.append((f"{section.name}.{name}", typing.get_args(hint)))
    return found


def test_every_enum_value_reads_as_typed_on_the_command_line_and_in_yaml(tmp_path: Path):
    """Bare on/off/yes/no (which YAML reads as booleans) mean the choice typed, for every enum key."""
    keys = _enum_keys()
    assert ("loss.scale_align", ("auto", "on", "off")) in keys and len(keys) >= 10
    needs = {"model.pretrained=file": ["model.weights=w.safetensors"]}  # cross-field rule, not typing
    for key, choices in keys:
        for choice in choices:
            section, name = key.split(".")
            extra = needs.get(f"{key}={choice}", [])
            assert getattr(getattr(load_config(None, [f"{key}={choice}", *extra]), section), name) == choice, key
            (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {choice}\n")
            assert getattr(getattr(load_config(tmp_path / "c.yaml", extra), section), name) == choice, key


def test_a_boolean_is_still_refused_where_no_choice_reads_as_it():
    with pytest.raises(ConfigError, match=r"loss\.rho: True is not one of"):
        load_config(None, ["loss.rho=on"])
