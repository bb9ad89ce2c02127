"""onnxruntime's own operators (its contrib ops) in a model that onnx.checker is to check.

onnxruntime registers operators beyond the ONNX standard: most in the ``com.microsoft``
domain (Attention, SkipLayerNormalization, MatMulNBits, ...), which onnx.checker leaves
alone (it checks only the domains it has schemas for), and a few in the default domain
(SimplifiedLayerNormalization, what onnxruntime-genai's model builder emits), which
onnx.checker refuses: "No Op registered for SimplifiedLayerNormalization with
domain_version of 22". Such a model is valid for the runtime it was built for, so the
check hides those nodes from onnx.checker (``hidden_from_checker``) and checks them
against the schemas onnxruntime registers instead (``check_runtime_ops``): the op exists
at the model's opset, with as many inputs and outputs and the attributes its schema asks.
An op known to neither is refused as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import onnx

from ..errors import InvalidModel

DEFAULT_DOMAINS = ("", "ai.onnx")
# Where the default-domain runtime ops are moved while onnx.checker runs: a domain it has no
# schemas for, so it checks the node's structure but not its signature.
HIDING_DOMAIN = "onnxprune.runtime_ops"


@functools.cache
def runtime_schemas() -> dict[tuple[str, str], list]:
    """(domain, op) -> onnxruntime's schemas of that op (each with its ``since_version``); empty
    without onnxruntime (a model with such ops is then checked by onnx.checker alone)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        return {}
    found: dict[tuple[str, str], list] = {}
    for schema in ort_state.get_all_operator_schema():
        domain = "" if schema.domain in DEFAULT_DOMAINS else schema.domain
        found.setdefault((domain, schema.name), []).append(schema)
    return found


def runtime_schema(domain: str, op: str, version: int):
    """onnxruntime's schema of ``op`` at opset ``version`` of ``domain``, or None."""
    domain = "" if domain in DEFAULT_DOMAINS else domain
    fitting = [s for s in runtime_schemas().get((domain, op), ()) if s.since_version <= version]
    return max(fitting, key=lambda s: s.since_version) if fitting else None


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain in DEFAULT_DOMAINS else o.domain): o.version for o in model.opset_import}


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for body in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _nodes(body)


def runtime_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Default-domain nodes of ops that ONNX has no schema for at the model's opset but
    onnxruntime registers there (SimplifiedLayerNormalization)."""
    opset = _opsets(model).get("")
    if opset is None:
        return []
    return [n for n in _nodes(model.graph)
            if n.domain in DEFAULT_DOMAINS and not onnx.defs.has(n.op_type, opset, "")
            and runtime_schema("", n.op_type, opset) is not None]


@contextlib.contextmanager
def hidden_from_checker(model: onnx.ModelProto) -> Iterator[list[onnx.NodeProto]]:
    """While inside: ``runtime_only_nodes`` moved to HIDING_DOMAIN (declared in the opset
    imports), so onnx.checker and ONNX inference skip them. Edits the model in place, not a
    copy (a copy would double the weights in memory), and restores it on the way out."""
    nodes = runtime_only_nodes(model)
    if not nodes:
        yield nodes
        return
    domains = [n.domain for n in nodes]
    for n in nodes:
        n.domain = HIDING_DOMAIN
    model.opset_import.append(onnx.helper.make_opsetid(HIDING_DOMAIN, 1))
    try:
        yield nodes
    finally:
        for n, domain in zip(nodes, domains):
            n.domain = domain
        del model.opset_import[-1]


def check_runtime_ops(model: onnx.ModelProto, where: str = "") -> None:
    """InvalidModel unless every node of an op onnxruntime registers (and ONNX does not, at the
    model's opset) fits onnxruntime's schema: input and output counts, required attributes."""
    opsets = _opsets(model)
    for node in _nodes(model.graph):
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        version = opsets.get(domain)
        if version is None or (domain == "" and onnx.defs.has(node.op_type, version, "")):
            continue
        schema = runtime_schema(domain, node.op_type, version)
        if schema is not None:
            _check_against(node, schema, where)


def _check_against(node: onnx.NodeProto, schema, where: str) -> None:
    label = f"{where}node {node.name or node.output[0]} ({node.domain or 'ai.onnx'}::{node.op_type})"
    inputs = len(node.input)
    if not schema.min_input <= inputs <= schema.max_input:
        raise InvalidModel(f"{label}: {inputs} input(s), onnxruntime's schema takes "
                           f"{schema.min_input} to {schema.max_input}")
    outputs = len(node.output)
    if not schema.min_output <= outputs <= schema.max_output:
        raise InvalidModel(f"{label}: {outputs} output(s), onnxruntime's schema gives "
                           f"{schema.min_output} to {schema.max_output}")
    given = {a.name for a in node.attribute}
    missing = sorted(name for name, a in schema.attributes.items() if a.required and name not in given)
    if missing:
        raise InvalidModel(f"{label}: required attribute(s) {', '.join(missing)} missing")
