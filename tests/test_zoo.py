"""Torchvision models, exported with both exporters, pruned at 0.4: valid and >= 1.3x fewer MACs.

Exports come from tools/zoo.py and are cached in $ONNXPRUNE_ZOO_CACHE (default
.cache/zoo), so only the first run pays for them. Slow: ``pytest -m "not slow"`` skips it.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import onnx
import pytest

from tools import zoo

RATIO = 0.4
# Stricter than zoo.MAC_TARGET where the transformer issue asks for more (heads + MLP pruned).
MAC_TARGETS = {"vit_b_16": 1.4}

CASES = (
    [pytest.param(m, "legacy", False, id=f"{m}-legacy") for m in zoo.LEGACY_MODELS]
    + [pytest.param(m, "dynamo", False, id=f"{m}-dynamo") for m in zoo.DYNAMO_MODELS]
    + [pytest.param("resnet18", "legacy", True, id="resnet18-legacy-fresh")]
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return zoo.default_cache_dir()  # $ONNXPRUNE_ZOO_CACHE or .cache/zoo


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shared_initializers(path: Path) -> list[str]:
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    uses = collections.Counter(i for n in model.graph.node for i in n.input if i in inits)
    return [name for name, n in uses.items() if n > 1]


def test_target_list():
    assert len(zoo.LEGACY_MODELS) == 20 and len(zoo.DYNAMO_MODELS) == 5
    assert len(CASES) == 26


@pytest.mark.parametrize("name, exporter, fresh", CASES)
def test_zoo_model_prunes(name, exporter, fresh, cache_dir, tmp_path):
    path = zoo.export(name, exporter, fresh, cache_dir)
    if fresh:
        # The point of this case: the exporter shares one zero bias among several convs.
        assert _shared_initializers(path), "fresh export has no shared initializer to survive"
    before = _digest(path)
    row = zoo.evaluate(path, name, exporter, RATIO, fresh, workdir=tmp_path)
    assert row.error is None, row.error
    assert row.output_names_same and row.output_shapes_same
    assert row.valid
    assert row.max_deviation is not None and row.max_deviation < float("inf")
    assert row.groups_pruned >= 1
    assert row.params_after < row.params_before
    assert row.macs_ratio is not None and row.macs_ratio >= MAC_TARGETS.get(name, zoo.MAC_TARGET), (
        f"{name} ({exporter}): only {row.macs_ratio:.2f}x fewer MACs"
    )
    assert _digest(path) == before  # the input is never modified
    assert list(tmp_path.iterdir()) == []  # evaluate cleans up after itself
