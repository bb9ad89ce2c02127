"""Per-group ratios from a file (``--ratios FILE``), resolved against the model's groups.

The file is JSON (or, with PyYAML, YAML): a mapping from a group id, or a
glob over a group's source node names, to a ratio; later entries override
earlier ones.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ..checks import check_ratio_mapping
from ..errors import UsageError, quoted
from .reading import parse_json, parse_yaml, read_text


def load_ratios(path) -> dict[str, float]:
    """A ``--ratios`` file: JSON, or YAML (.yaml/.yml) when PyYAML is installed."""
    path = Path(path)
    text = read_text(path, "`ratios`")
    parse = parse_yaml if path.suffix.lower() in (".yaml", ".yml") else parse_json
    return check_ratio_mapping(parse(text, path, "`ratios`"), f"`ratios` {path}")


def resolve_ratios(groups, mapping: dict[str, float], what: str = "`ratios`") -> dict[str, float]:
    """Group id -> ratio: each key is a group id or a glob over group source names; later keys win."""
    mapping = check_ratio_mapping(mapping, what)
    prunable = [g for g in groups if g.prunable]
    resolved = {}
    for key, ratio in mapping.items():
        matched = [g for g in prunable if g.id == key] or [g for g in prunable if _glob_matches(g, key)]
        if not matched:
            raise UsageError(_no_match(groups, key, what))
        resolved.update({g.id: ratio for g in matched})
    return resolved


def _glob_matches(group, pattern: str) -> bool:
    """A glob over the group's source nodes, by ONNX name or by module path (graph/names.py)."""
    return any(s and fnmatch.fnmatchcase(s, pattern) for s in (*group.sources, *group.modules))


def _no_match(groups, key: str, what: str) -> str:
    unprunable = next((g for g in groups if not g.prunable and (g.id == key or _glob_matches(g, key))), None)
    if unprunable is not None:
        why = "; ".join(unprunable.blocked) or "too narrow to prune"
        return f"{what}: {quoted(key)} names a group that cannot be pruned ({why})"
    return (f"{what}: {quoted(key)} matches no group id or source node name or module path "
            "(ids: onnxprune info --json, or onnxprune.analyse)")
