"""The `distill-depth` console script: every subcommand answers --help without error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distill_depth.cli import SUBCOMMANDS


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "distill_depth.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name: str):
    out = subprocess.run([sys.executable, "-m", "distill_depth.cli", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: distill-depth " + name in out.stdout
