"""ONNX operators as torch functions: the executor's op table, one module per op family.

``OPS[op_type](attrs, inputs)`` computes one node: ``attrs`` is the node's
attributes as Python values (strings decoded, tensors as torch tensors) plus
``_opset`` and ``_num_outputs``; ``inputs`` is the list of input tensors,
``None`` for a missing optional one (trailing ones may be absent). It returns
a tensor, or a tuple of tensors for a node with several outputs.

``HOST_INPUTS[op_type]`` names the input positions an op reads as Python
numbers (shapes, axes, pads, scales, ...). The executor keeps those on the CPU,
so reading them never waits for an accelerator.

``PREPARE[op_type](attrs)`` runs once per node when the executor is built: it
checks attributes (``UnsupportedModel`` for what is not implemented) and
precomputes what does not depend on the inputs.

The families mirror the rule table (``onnxprune/rules/``) where the ops have
channel rules: conv.py, linear.py, norm.py, pool.py (pools, reductions, Pad;
Resize and Upsample in resize.py), shape.py, reshape.py, elementwise.py (with the
activations, Cast and the bitwise ops), recurrent.py (LSTM, GRU, RNN), contrib.py (onnxruntime's contrib ops,
keyed "com.microsoft.Attention" outside the default domain, as in the rule table). Ops without a channel rule live in
index.py (gathers, scatters, TopK, ArgMax, ...), generate.py (ConstantOfShape,
Range, Trilu, CumSum) and layout.py (Expand, Tile, DepthToSpace, SpaceToDepth).
registry.py holds the tables, the ``@op`` decorator and the shared helpers; it
imports no family. tests/test_executor_coverage.py checks that every op with a
rule has an implementation here, and lists the implemented ops that have no rule.

Semantics follow the ONNX operator documents; where a numeric detail is a
choice (pooling windows in ceil mode, Resize coordinates), it follows
onnxruntime, which the tests compare against.
"""

from __future__ import annotations

# Register every family (imported for their side effect: each module fills OPS).
from . import (  # noqa: F401
    contrib,
    conv,
    elementwise,
    generate,
    index,
    layout,
    linear,
    norm,
    pool,
    recurrent,
    reshape,
    resize,
    shape,
)
from .registry import HOST_INPUTS, ONNX_TO_TORCH, OPS, PREPARE, TORCH_TO_ONNX

__all__ = ["HOST_INPUTS", "ONNX_TO_TORCH", "OPS", "PREPARE", "TORCH_TO_ONNX"]
