"""The documentation's links lead somewhere and its commands name real subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from distill_depth.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
SUBCOMMAND = re.compile(r"(?<![\w-])distill-depth ([a-z][a-z-]*)")


def _prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """Lines outside and inside fenced code blocks (a link inside a code block is no link)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _prose_and_code(page.read_text())
    return {_anchor(line.lstrip("#")) for line in prose if re.match(r"^#{1,6} ", line)}


def _relative_links(page: Path) -> list[str]:
    prose, _ = _prose_and_code(page.read_text())
    links = [m.group(1) for line in prose for m in LINK.finditer(line)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]  # http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for link in _relative_links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def _subcommands() -> set[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "distill_depth.cli has no subcommands"
    return set(actions[0].choices)


def test_every_command_in_the_readme_code_blocks_is_a_real_subcommand() -> None:
    known = _subcommands()
    _, code = _prose_and_code((REPO / "README.md").read_text())
    shown = {m.group(1) for line in code for m in SUBCOMMAND.finditer(line)}
    assert {"make-shards", "evaluate", "predict"} <= shown  # the parse really saw the commands
    assert shown <= known, f"README.md shows unknown subcommands {sorted(shown - known)}; known: {sorted(known)}"


def test_every_command_in_the_docs_code_blocks_is_a_real_subcommand() -> None:
    known = _subcommands()
    unknown = {}
    for page in PAGES[1:]:
        _, code = _prose_and_code(page.read_text())
        bad = {m.group(1) for line in code for m in SUBCOMMAND.finditer(line)} - known
        if bad:
            unknown[page.name] = sorted(bad)
    assert not unknown, f"unknown subcommands in docs/ code blocks: {unknown}; known: {sorted(known)}"


def test_readme_stays_short_and_keeps_the_quick_start_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, "README.md grew past ~200 lines: move the detail into docs/"
    ci = (REPO / ".ci" / "run").read_text()
    command = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && python -m pytest -q -ra"
    assert command in readme.splitlines()
    assert command.replace("pip install -e", "pip install -q -e") in ci  # CI runs the README's command
