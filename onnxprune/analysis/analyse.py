"""The analysis of a model: its static shapes, the graph view the rules read, its channel groups.

``analyse`` never modifies the model. The view it builds is the graph that a
cut edits in place (cut/surgery.py), so an analysis serves one cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UnsupportedModel
from ..graph.shapes import Shapes, analyse_shapes
from ..graph.view import GraphView
from ..options import AnalysisOptions
from .groups import Group, find_groups

_INT_WEIGHTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


@dataclass
class Analysis:
    model: onnx.ModelProto
    shapes: Shapes
    view: GraphView
    groups: list[Group]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


def refuse_hand_dequantized(model: onnx.ModelProto) -> None:
    """Integer weights dequantized by hand (Cast, then Mul by a scale) are refused: no rule follows
    them (QDQ and QOperator models have rules: rules/quant.py)."""
    small = 16
    int_weights = {t.name for t in model.graph.initializer if t.data_type in _INT_WEIGHTS and np.prod(t.dims) > small}
    cast = next((n for n in model.graph.node if n.op_type == "Cast" and n.input and n.input[0] in int_weights), None)
    if cast is not None:
        raise UnsupportedModel(f"quantized model (int8 weights behind Cast ({cast.input[0]})): prune the float "
                               "model, then quantize the result")


def analyse(model: onnx.ModelProto, options: AnalysisOptions | None = None, shapes: Shapes | None = None) -> Analysis:
    """Channel groups of ``model`` (which is not modified). ``shapes``: of an earlier analysis of
    the same model with the same options (read, never modified), so that a fresh view for one
    more cut does not infer them again."""
    options = options or AnalysisOptions()
    refuse_hand_dequantized(model)
    shapes = shapes or analyse_shapes(model, options.input_shapes)
    view = GraphView.from_model(model, shapes)
    view.prune_hidden = options.prune_hidden
    view.prune_kv_groups = options.prune_kv_groups
    return Analysis(model, shapes, view, find_groups(view, tuple(options.ignore), options.allow_io_change))
