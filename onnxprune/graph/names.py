"""Names a user knows a node by: its ONNX name, and the module path an exporter recorded for it.

The torch dynamo exporter names nodes after the aten op (``node_conv2d_3``, ``node_linear_12``)
and writes where each came from in the node's ``metadata_props``:
``pkg.torch.onnx.name_scopes`` is the module path, one scope per level
(``['', 'features', 'features.3', 'conv2d']``: module ``features.3``, then the op), and
``namespace`` says the same with the classes (``: Net/features: Sequential/features.3:
Conv2d/conv2d: aten.conv2d.default``). ``--ignore`` globs match either name.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch

import onnx

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
NAMESPACE = "namespace"
CLOSE_MATCHES = 3


def module_path(node: onnx.NodeProto) -> str | None:
    """The module path the exporter recorded for ``node`` (``features.3``); None when it recorded
    none, or the node was written by the top-level module's own forward."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = _scopes(props.get(NAME_SCOPES)) or _namespace_scopes(props.get(NAMESPACE))
    # the last scope is the op itself; before it, the module scopes from the root ('') down
    modules = [s for s in scopes[:-1] if s]
    return modules[-1] if modules else None


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> module path, for the named nodes of the main graph that have one."""
    found = {}
    for node in model.graph.node:
        path = module_path(node) if node.name and node.metadata_props else None
        if path:
            found[node.name] = path
    return found


def _scopes(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        scopes = ast.literal_eval(text)  # written as a Python list literal
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []


def _namespace_scopes(text: str | None) -> list[str]:
    """``: Net/features: Sequential/features.3: Conv2d/conv2d: aten.conv2d.default`` ->
    ['', 'features', 'features.3', 'conv2d'] (each level is "name: class")."""
    if not text:
        return []
    return [level.partition(": ")[0].strip() for level in text.split("/")]


def matches(name: str | None, patterns) -> list[str]:
    """The globs of ``patterns`` that ``name`` matches (none for a missing name)."""
    return [p for p in patterns if name and fnmatch.fnmatchcase(name, p)]


def unmatched_ignore_message(pattern: str, names) -> str:
    """The warning for an ``ignore`` glob that matched nothing, with the closest of ``names`` (a typo
    otherwise goes unnoticed: the run prunes what the user meant to keep)."""
    close = difflib.get_close_matches(pattern, sorted(set(names)), n=CLOSE_MATCHES)
    hint = f"; closest names: {', '.join(close)}" if close else ""
    return f"`ignore` {pattern!r} matches no node, module or weight name: it leaves nothing alone{hint}"


def scoped_name_path(name: str) -> str | None:
    """The module path the legacy torch exporter spells into a node's name, without metadata:
    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (a level that qualifies the one above
    it, ``layer1.0`` under ``layer1``, replaces it). None for a name that is not so scoped."""
    if not name.startswith("/") or name.count("/") < 2:
        return None
    path: list[str] = []
    for level in name.strip("/").split("/")[:-1]:  # the last level is the op
        if path and level.startswith(path[-1] + "."):
            path[-1] = level
        elif level:
            path.append(level)
    return ".".join(path) or None
