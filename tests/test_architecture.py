"""The package's shape: imports run one way, modules stay small, and every option the library's
messages name (`round_to`) is one the command line can show as its flag."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxprune"
# Package __init__ modules that import their own modules to fill a table (the rule table, the
# executor's op table): their edges to their own submodules are registrations, not dependencies.
REGISTERS = {"onnxprune.rules", "onnxprune.executor.ops"}
FRONT_ENDS = ("onnxprune.api", "onnxprune.cli")
MAX_LINES = 500


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in it (function-level imports too)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    if module in REGISTERS:
        found = {t for t in found if not t.startswith(module + ".")}
    return found


def cycles() -> list[list[str]]:
    """Every import cycle between modules, as a path that returns to its start (Tarjan's SCCs)."""
    graph = {m: imports(m) for m in MODULES}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_loop(graph, sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _loop(graph, component: list[str]) -> list[str]:
    """One cycle through the component's first module (breadth first, so it is a shortest one)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_imports_run_one_way():
    found = cycles()
    assert not found, "import cycles (make the lower module not know the higher one):\n" + \
        "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other (one inside a function) are found."""
    package = tmp_path / "onnxprune"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "ROOT", tmp_path)
    monkeypatch.setattr(here, "MODULES", {_name(p): p for p in sorted(package.rglob("*.py"))})
    assert cycles() == [["onnxprune.a", "onnxprune.b", "onnxprune.a"]]


def test_nothing_below_the_front_ends_imports_them():
    users = {m: sorted(imports(m) & {"onnxprune.api"}) for m in MODULES if not m.startswith(FRONT_ENDS)}
    assert not {m: u for m, u in users.items() if u}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by responsibility (at most {MAX_LINES})"


# --- option names in messages -----------------------------------------------------------------

OPTION = re.compile(r"(?<!`)`(\w+)`(?!`)")
# Named in messages but with no flag of their own: Python API only.
API_ONLY = {"verify", "options", "embeddings", "scores", "warmup"}


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def option_names() -> dict[str, str]:
    """Option names in backticks in the library's string literals (not docstrings) -> a module using it."""
    names = {}
    for module, path in MODULES.items():
        if module.startswith("onnxprune.cli"):
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                for name in OPTION.findall(node.value):
                    names.setdefault(name, module)
    return names


def test_every_option_a_message_names_has_a_flag():
    from onnxprune.cli import COMMANDS, prune

    flags = set(prune.FLAGS)
    for command in COMMANDS.values():
        flags |= set(command.FLAGS)
    missing = {name: module for name, module in option_names().items() if name not in flags | API_ONLY}
    assert not missing, f"options named in messages without a flag in any cli FLAGS table: {missing}"


def test_the_command_line_shows_flags_for_option_names():
    from onnxprune.cli import prune
    from onnxprune.cli.options import render

    assert render("`plan` and `ratio` are exclusive; see `round_to`", prune.FLAGS) == \
        "--plan-in and --structured are exclusive; see --round-to"
    assert render("`unknown_thing` stays readable", prune.FLAGS) == "unknown_thing stays readable"
