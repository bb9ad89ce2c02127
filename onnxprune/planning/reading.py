"""Reading the small JSON and YAML files a user gives (``--ratios``, ``--plan-in``), within bounds.

These files are a few kilobytes written by hand or by onnxprune. A hostile or
broken one must end in a one-line usage error, not in gigabytes of memory or
a RecursionError: at most ``MAX_BYTES`` of text, nesting at most ``MAX_DEPTH``
deep, and for YAML at most ``MAX_NODES`` nodes once aliases are expanded (a
362-byte file of nested aliases names 10^9 of them). YAML is read with a
SafeLoader subclass: plain data, no Python objects.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from ..errors import MissingDependency, UsageError

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 10_000


def read_text(path, what: str) -> str:
    """The file's text, refused beyond MAX_BYTES (read no further than that)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise UsageError(f"{what} {path}: larger than {MAX_BYTES // 1024} KB, too large for this kind of file")
        return data.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path}: not UTF-8 text") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def parse_json(text: str, path, what: str):
    """JSON, its nesting checked first (json's recursive parser would fail on 100k levels)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            raise UsageError(f"{what} {path}: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:  # unbalanced brackets can still hide depth from the count above
        raise UsageError(f"{what} {path}: nested deeper than {MAX_DEPTH} levels") from None


def parse_yaml(text: str, path, what: str):
    try:
        import yaml
    except ImportError:
        raise MissingDependency(f"{what} {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                "or write the file as JSON") from None
    loader = _bounded_loader()(text)
    try:
        return loader.get_single_data()
    except _TooLarge as exc:
        raise UsageError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path}: not valid YAML ({type(exc).__name__})") from None
    except RecursionError:
        raise UsageError(f"{what} {path}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


class _TooLarge(Exception):
    pass


@functools.cache
def _bounded_loader():
    """A SafeLoader that bounds nesting while composing and counts expanded nodes before
    constructing (PyYAML shares an aliased node; what reads the result expands it)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_document(self, node):
            _check_expansion(node, yaml)
            return super().construct_document(node)

    return BoundedLoader


def _check_expansion(root, yaml) -> None:
    """Walk the node graph as a reader of the data would, aliases expanded, up to MAX_NODES."""
    stack, seen = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise _TooLarge(f"more than {MAX_NODES} values once its aliases are expanded")
        if depth > MAX_DEPTH:
            raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
