"""docs/configuration.md is generated from the config docstrings and must not go stale."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from distill_depth import config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gen_config_docs.py"
PAGE = REPO / "docs" / "configuration.md"


def _generator() -> ModuleType:
    # scripts/ is no package: load the script by path, as `python scripts/gen_config_docs.py` does.
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(type(value), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_committed_page_is_what_the_generator_writes_now() -> None:
    assert PAGE.read_text() == _generator().render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py` and commit the page"
    )


def test_every_dataclass_field_has_a_row_with_a_description() -> None:
    rows = {line.split("|")[1].strip(): line for line in PAGE.read_text().splitlines() if line.startswith("| `")}
    keys = _keys(config.Config)
    assert len(keys) > 50  # the walk really went into every section
    for key in keys:
        assert f"`{key}`" in rows, f"{key} has no row in docs/configuration.md"
        description = rows[f"`{key}`"].rstrip(" |").rsplit(" | ", 1)[-1]
        assert description.strip(), f"{key} has an empty description"


def test_check_mode_exits_1_naming_the_script_when_stale(tmp_path: Path, capsys) -> None:
    generator = _generator()
    generator.PAGE = tmp_path / "configuration.md"
    generator.PAGE.write_text("old\n")
    assert generator.main(["--check"]) == 1
    assert "run `python scripts/gen_config_docs.py`" in capsys.readouterr().err
    generator.main([])
    assert generator.main(["--check"]) == 0


def test_script_runs_as_a_command() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
