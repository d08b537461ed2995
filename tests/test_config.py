"""Config: defaults, YAML with `base:` inheritance, dotted overrides, clear errors."""

from __future__ import annotations

import re
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


def test_train_compile_reads_the_boolean_it_was_before_it_had_a_losses_choice(tmp_path: Path):
    """``train.compile`` was a bool: ``true``/``false`` on the command line, in YAML and in the
    config.yaml of older runs read as ``on``/``off``; ``losses`` is the new choice."""
    assert load_config(None, ["train.compile=true"]).train.compile == "on"
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
    assert load_config(None, ["train.compile=losses"]).train.compile == "losses"
    assert config_from_dict({"train": {"compile": True}}).train.compile == "on"
    config_file = tmp_path / "old.yaml"
    config_file.write_text("train:\n  compile: false\n")
    assert load_config(config_file).train.compile == "off"
    with pytest.raises(ConfigError, match=r"train\.compile: 'fast' is not one of"):
        load_config(None, ["train.compile=fast"])


# --- data.u_sources (M / S / MS) and the deprecated data.use_stereo ---------------------------------


@pytest.mark.parametrize(("row", "sources", "stereo", "temporal"), [
    ("m", "temporal", False, True), ("s", "stereo", True, False), ("ms", "temporal+stereo", True, True),
])
def test_paper_rows_are_configs(row: str, sources: str, stereo: bool, temporal: bool):
    """configs/kitti_{m,s,ms}.yaml inherit the KITTI recipe and differ in U's sources (and the
    run folder); the bench equivalents inherit the mutual benchmark run the same way."""
    repo = Path(__file__).resolve().parent.parent
    recipe = load_config(repo / "configs" / "kitti_eigen_zhou.yaml")
    cfg = load_config(repo / "configs" / f"kitti_{row}.yaml")
    assert cfg.data.u_sources == sources
    assert (cfg.data.uses_stereo, cfg.data.uses_temporal) == (stereo, temporal)
    assert cfg.optim == recipe.optim and cfg.model == recipe.model and cfg.data.batch_size == recipe.data.batch_size
    assert cfg.train.output_dir == f"runs/kitti_{row}"
    bench = load_config(repo / "configs" / f"bench_{row}.yaml")
    assert bench.data.u_sources == sources and bench.branches == ("S", "U")


@pytest.mark.parametrize(("old", "new"), [("true", "temporal+stereo"), ("false", "temporal")])
def test_use_stereo_is_a_deprecated_alias(tmp_path: Path, old: str, new: str):
    """Old configs (and saved run configs) still load, with a warning naming the replacement."""
    (tmp_path / "old.yaml").write_text(f"data:\n  use_stereo: {old}\n")
    with pytest.warns(FutureWarning, match=f"data.use_stereo.*deprecated.*data.u_sources={re.escape(new)}"):
        cfg = load_config(tmp_path / "old.yaml")
    assert cfg.data.u_sources == new and cfg.data.use_stereo is (old == "true")
    with pytest.warns(FutureWarning):
        assert load_config(None, [f"data.use_stereo={old}"]).data.u_sources == new
    assert "use_stereo" not in cfg.to_dict()["data"]  # saved configs carry only the new key
    with pytest.raises(ConfigError, match="data.use_stereo: expected true/false"):
        load_config(None, ["data.use_stereo=maybe"])


def test_u_sources_rejects_unknown_modes():
    with pytest.raises(ConfigError, match=r"data.u_sources: 'video' is not one of"):
        load_config(None, ["data.u_sources=video"])


@pytest.mark.parametrize(("sources", "aligned", "median_scaled_alone"), [
    ("temporal", True, True), ("stereo", False, False), ("temporal+stereo", False, False),
])
def test_scale_rules_follow_the_sources(sources: str, aligned: bool, median_scaled_alone: bool):
    """``loss.scale_align: auto`` and median scaling ``auto``: stereo in U's sources → metric."""
    from distill_depth.evaluation.inference import fusion_aligns_u, needs_median_scaling
    from distill_depth.losses import aligns_u_scale

    cfg = load_config(None, [f"data.u_sources={sources}"])
    assert aligns_u_scale(cfg.loss.scale_align, cfg.data.uses_stereo) is aligned
    assert fusion_aligns_u(cfg) is aligned
    alone = load_config(None, [f"data.u_sources={sources}", "branches=[U]"])
    assert needs_median_scaling(alone, "auto", "U") is median_scaled_alone
