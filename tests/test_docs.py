"""The documentation tells the truth: generated pages current, the README a short guide whose quick
start is what `make demo` runs, its code layout the package's tree, every relative link resolving."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tools import gen_docs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "models" / "README.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("page", sorted(gen_docs.PAGES))
def test_generated_pages_are_current(page):
    made_with = gen_docs.generated_with(page)
    if made_with != gen_docs.PYTHON:  # argparse's help layout differs between Python versions
        pytest.skip(f"docs/{page} was generated with Python {made_with}, this is {gen_docs.PYTHON}")
    assert page not in gen_docs.stale(), f"docs/{page} is not current: run python -m tools.gen_docs"


def test_readme_is_a_short_users_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 400
    headings = [line for line in lines if line.startswith("## ")]
    order = ["## Install", "## Quick start", "## What to prune, and how", "## Exit codes"]
    assert [h for h in headings if h in order] == order


def _quick_start() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## What to prune")]
    return [line[2:] for line in section.splitlines() if line.startswith("$ ")]


def _demo_recipe() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"(?m)^(\w+) [:?]?= (.*)$", makefile))
    recipe = makefile[makefile.index("\ndemo:"):].split("\n\n")[0].splitlines()[1:]
    commands = []
    for line in recipe:
        line = line.strip().lstrip("@")
        for _ in range(3):  # nested variables: DEMO_OUT uses BUILD
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        if line.startswith(".venv/bin/onnxprune"):
            commands.append(line.removeprefix(".venv/bin/"))
    return commands


def test_make_demo_runs_the_readme_quick_start():
    readme = [shlex.split(c) for c in _quick_start()]
    assert len(readme) == 3 and readme == [shlex.split(c) for c in _demo_recipe()]


def test_the_quick_start_needs_only_the_repository():
    for command in _quick_start():
        for word in shlex.split(command):
            if word.startswith("models/"):
                assert (ROOT / word).exists(), word


def test_readme_code_layout_is_the_package_tree():
    text = README.read_text()
    table = text[text.index("### Code layout"):text.index("## Read more")]
    listed = set(re.findall(r"^\| `([\w.]+/?)` \|", table, re.M))
    package = ROOT / "onnxprune"
    tree = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
    tree |= {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert listed == tree


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target, anchor in LINK.findall(page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: link to {target} resolves to nothing"
            if anchor and target.endswith(".md"):
                slugs = {_slug(line.lstrip("#")) for line in (page.parent / target).read_text().splitlines()
                         if line.startswith("#")}
                assert anchor[1:] in slugs, f"{page.name}: {target}{anchor} names no heading there"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_package_index_page_has_no_repository_links_or_make_steps():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    text = (ROOT / readme).read_text()
    assert not [t for t, _ in LINK.findall(text) if "://" not in t], "relative links do not resolve on an index"
    assert "make " not in text


def test_every_flag_in_the_readme_exists():
    cli = (ROOT / "docs" / "cli.md").read_text()
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README.read_text()))
    missing = sorted(f for f in flags if f not in cli and f not in ("--no-compensate", "--help", "--debug"))
    assert not missing, f"flags in the README that no command has: {missing}"
