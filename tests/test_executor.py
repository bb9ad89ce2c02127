"""onnxprune.executor.module.TorchGraph against onnxruntime: single ops, zoo models, transformers,
gradients, write-back.

Tolerance: max |diff| / max |reference| <= 1e-4 for models (the brief's figure), tighter for
single ops. Zoo exports come from tools/zoo.py (cached in .cache/zoo).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UnsupportedModel, UsageError
from tools import zoo

from graphs import GraphBuilder, rel_err, session

torch = pytest.importorskip("torch")
from onnxprune.executor.module import TorchGraph, tensor_from_proto  # noqa: E402  (needs torch)

ROOT = Path(__file__).resolve().parent.parent

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NP_TYPES = {np.dtype(np.float32): F32, np.dtype(np.int64): I64, np.dtype(np.int32): TensorProto.INT32,
            np.dtype(bool): TensorProto.BOOL, np.dtype(np.float16): TensorProto.FLOAT16}


# --- building one-op models ----------------------------------------------------------------------

class Feed:
    """A graph input with this value (tests feed it; everything else is an initializer)."""

    def __init__(self, value):
        self.value = np.asarray(value)


def rand(*shape, seed=0):
    return Feed(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def weight(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ints(*values):
    return np.asarray(values, dtype=np.int64)


def one_op(op_type, inputs, attrs=None, outputs=1, opset=17, subgraphs=None):
    """(model, feeds): a graph with one node; Feed inputs are graph inputs, arrays initializers."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(value, Feed):
            graph_inputs.append(helper.make_tensor_value_info(name, NP_TYPES[value.value.dtype], value.value.shape))
            feeds[name] = value.value
        else:
            inits.append(numpy_helper.from_array(np.asarray(value), name))
    outs = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, outs, name="node", **(attrs or {}), **(subgraphs or {}))
    untyped = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    graph = helper.make_graph([node], "one_op", graph_inputs, untyped, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), feeds  # output types, which onnxruntime needs


def ort_run(model, feeds, outputs=None):
    return session(model).run(outputs, feeds)


def torch_run(tg, feeds, outputs=None):
    with torch.no_grad():
        out = tg.run({k: torch.from_numpy(v) for k, v in feeds.items()}, outputs)
    return [v.numpy() for v in out.values()]


def assert_matches(model, feeds, tol=1e-5, outputs=None):
    ref = ort_run(model, feeds, outputs)
    got = torch_run(TorchGraph(model), feeds, outputs)
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert r.dtype == g.dtype, f"output {i}: dtype {g.dtype}, onnxruntime {r.dtype}"
        assert r.shape == g.shape, f"output {i}: shape {g.shape}, onnxruntime {r.shape}"
        if r.dtype.kind in "fc":
            assert rel_err(r, g) <= tol, f"output {i}: relative error {rel_err(r, g):.3g}"
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"output {i}")


X4 = (1, 3, 9, 9)
NEG = Feed(np.array([[-7, -3, 0], [3, 7, 9]], dtype=np.int64))
HALVES = Feed(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7], dtype=np.float32))

OP_CASES = {
    # convolution
    "conv_asym_pads_stride": ("Conv", [rand(*X4), weight(4, 3, 3, 3), weight(4)],
                              dict(pads=[0, 1, 2, 1], strides=[2, 2], kernel_shape=[3, 3])),
    "conv_same_upper": ("Conv", [rand(*X4), weight(4, 3, 4, 4)], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_same_lower": ("Conv", [rand(1, 3, 10, 10), weight(4, 3, 4, 4)],
                        dict(auto_pad="SAME_LOWER", strides=[3, 3])),
    "conv_valid_dilated": ("Conv", [rand(*X4), weight(4, 3, 3, 3)], dict(auto_pad="VALID", dilations=[2, 2])),
    "conv_group": ("Conv", [rand(1, 4, 7, 7), weight(6, 2, 3, 3), weight(6)], dict(group=2, pads=[1, 1, 1, 1])),
    # depthwise: run on channels-last copies (ops/conv.py), the same values
    "conv_depthwise": ("Conv", [rand(2, 4, 7, 7), weight(4, 1, 3, 3), weight(4)], dict(group=4, pads=[1, 1, 1, 1])),
    "conv_depthwise_asym_multiplier": ("Conv", [rand(2, 3, 9, 9), weight(6, 1, 5, 5)],
                                       dict(group=3, pads=[1, 2, 2, 1], strides=[2, 2])),
    "conv_1d": ("Conv", [rand(2, 3, 11), weight(5, 3, 3)], dict(pads=[1, 0], strides=[2])),
    "conv_3d": ("Conv", [rand(1, 2, 5, 6, 7), weight(3, 2, 3, 3, 3)], dict(pads=[1, 1, 1, 1, 1, 1])),
    "conv_transpose": ("ConvTranspose", [rand(1, 4, 5, 5), weight(4, 3, 3, 3), weight(3)],
                       dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "conv_transpose_asym_group": ("ConvTranspose", [rand(1, 4, 5, 5), weight(4, 2, 3, 3)],
                                  dict(strides=[2, 2], pads=[0, 1, 2, 1], group=2, dilations=[1, 2])),
    "conv_transpose_output_shape": ("ConvTranspose", [rand(1, 2, 4, 4), weight(2, 3, 3, 3)],
                                    dict(strides=[2, 2], output_shape=[10, 9])),
    "conv_transpose_same_upper": ("ConvTranspose", [rand(1, 2, 4, 5), weight(2, 3, 4, 4)],
                                  dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "conv_transpose_same_lower": ("ConvTranspose", [rand(1, 2, 4, 5), weight(2, 3, 3, 3)],
                                  dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    "conv_transpose_big_output_padding": ("ConvTranspose", [rand(1, 2, 4, 4), weight(2, 3, 3, 3)],
                                          dict(strides=[3, 3], output_padding=[2, 1])),
    # pooling
    "maxpool_ceil_pads": ("MaxPool", [rand(1, 2, 10, 10)],
                          dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "maxpool_asym_pads": ("MaxPool", [rand(1, 2, 9, 9)], dict(kernel_shape=[3, 3], pads=[0, 2, 1, 0])),
    "maxpool_asym_ceil": ("MaxPool", [rand(1, 2, 9, 8)],
                          dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 0, 1], ceil_mode=1)),
    "maxpool_dilated": ("MaxPool", [rand(1, 2, 9, 9)],
                        dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 1, 0, 2])),
    "maxpool_same_upper": ("MaxPool", [rand(1, 2, 9, 8)],
                           dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "maxpool_indices": ("MaxPool", [rand(2, 3, 6, 6)], dict(kernel_shape=[2, 2], strides=[2, 2]), 2),
    "maxpool_indices_column_major": ("MaxPool", [rand(2, 3, 6, 5)], dict(kernel_shape=[2, 2], storage_order=1), 2),
    "maxpool_indices_padded": ("MaxPool", [rand(2, 3, 7, 6)], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                   pads=[0, 0, 2, 1]), 2),
    "maxpool_1d": ("MaxPool", [rand(2, 3, 11)], dict(kernel_shape=[3], strides=[2], ceil_mode=1)),
    "avgpool_exclude_pad": ("AveragePool", [rand(1, 2, 9, 9)],
                            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avgpool_include_pad": ("AveragePool", [rand(1, 2, 9, 9)],
                            dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    "avgpool_ceil_include_pad": ("AveragePool", [rand(1, 2, 10, 10)],
                                 dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                      count_include_pad=1)),
    "avgpool_ceil_exclude_pad": ("AveragePool", [rand(1, 2, 10, 10)],
                                 dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "avgpool_asym_include_pad": ("AveragePool", [rand(1, 2, 8, 8)],
                                 dict(kernel_shape=[3, 2], pads=[0, 1, 2, 1], count_include_pad=1)),
    "avgpool_asym_exclude_pad": ("AveragePool", [rand(1, 2, 8, 8)],
                                 dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)),
    "avgpool_same_lower": ("AveragePool", [rand(1, 2, 8, 8)],
                           dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "global_max_pool": ("GlobalMaxPool", [rand(2, 3, 5, 4)], {}),
    "global_avg_pool_3d": ("GlobalAveragePool", [rand(2, 3, 2, 5, 4)], {}),
    # normalisation
    "batch_norm": ("BatchNormalization", [rand(2, 3, 4, 4), weight(3), weight(3, seed=2), weight(3, seed=3),
                                          np.abs(weight(3, seed=4)) + 0.5], dict(epsilon=1e-3)),
    "instance_norm": ("InstanceNormalization", [rand(2, 3, 4, 5), weight(3), weight(3, seed=2)], {}),
    "group_norm_18_per_group": ("GroupNormalization", [rand(2, 6, 4, 4), weight(3), weight(3, seed=2)],
                                dict(num_groups=3), 1, 18),
    "group_norm_21": ("GroupNormalization", [rand(2, 6, 4, 4), weight(6), weight(6, seed=2)],
                      dict(num_groups=3), 1, 21),
    "layer_norm_axis1": ("LayerNormalization", [rand(2, 3, 4), weight(3, 4), weight(3, 4, seed=2)], dict(axis=1)),
    "layer_norm_stats": ("LayerNormalization", [rand(2, 3, 4), weight(4)], dict(epsilon=1e-3), 3),
    "lrn_odd": ("LRN", [rand(1, 6, 3, 3)], dict(size=3, alpha=1e-2, beta=0.6, bias=2.0)),
    # resize
    "resize_nearest_scales": ("Resize", [rand(1, 2, 3, 4), None, np.array([1, 1, 2, 1.5], np.float32)],
                              dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                   nearest_mode="floor")),
    "resize_nearest_half_pixel": ("Resize", [rand(1, 2, 5, 4), None, None, ints(1, 2, 7, 9)],
                                  dict(mode="nearest")),
    "resize_nearest_round_ceil": ("Resize", [rand(1, 2, 5, 4), None, None, ints(1, 2, 8, 3)],
                                  dict(mode="nearest", nearest_mode="round_prefer_ceil")),
    "resize_linear_half_pixel": ("Resize", [rand(1, 2, 5, 4), None, np.array([1, 1, 2, 2.5], np.float32)],
                                 dict(mode="linear")),
    "resize_linear_align_corners": ("Resize", [rand(1, 2, 5, 4), None, None, ints(1, 2, 9, 7)],
                                    dict(mode="linear", coordinate_transformation_mode="align_corners")),
    "resize_linear_pytorch_half_pixel": ("Resize", [rand(1, 2, 5, 4), None, None, ints(1, 2, 1, 7)],
                                         dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")),
    "resize_linear_down": ("Resize", [rand(1, 2, 9, 8), None, np.array([1, 1, 0.5, 0.6], np.float32)],
                           dict(mode="linear", coordinate_transformation_mode="asymmetric")),
    "resize_cubic": ("Resize", [rand(1, 2, 5, 4), None, np.array([1, 1, 2, 1.5], np.float32)],
                     dict(mode="cubic")),
    "resize_cubic_exclude_outside": ("Resize", [rand(1, 2, 5, 4), None, None, ints(1, 2, 8, 7)],
                                     dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5,
                                          coordinate_transformation_mode="align_corners")),
    "resize_axes_keep_aspect": ("Resize", [rand(1, 2, 5, 4), None, None, ints(8, 9)],
                                dict(mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger"), 1, 18),
    "resize_opset10": ("Resize", [rand(1, 2, 3, 4), np.array([1, 1, 2, 2], np.float32)], dict(mode="nearest"), 1, 10),
    "upsample_opset9": ("Upsample", [rand(1, 2, 3, 4), np.array([1, 1, 2, 3], np.float32)],
                        dict(mode="linear"), 1, 9),
    # pad
    "pad_constant": ("Pad", [rand(2, 3, 4), ints(0, 1, 2, 1, 0, 1), np.array(1.5, np.float32)], {}),
    "pad_negative": ("Pad", [rand(2, 3, 4), ints(0, -1, 2, 0, 1, -2)], {}),
    "pad_reflect": ("Pad", [rand(1, 2, 4, 5), ints(0, 0, 2, 3, 0, 0, 3, 1)], dict(mode="reflect")),
    "pad_edge": ("Pad", [rand(1, 2, 4, 5), ints(0, 0, 2, 3, 0, 0, 3, 1)], dict(mode="edge")),
    "pad_wrap": ("Pad", [rand(1, 2, 4, 5), ints(0, 0, 2, 3, 0, 0, 3, 1)], dict(mode="wrap"), 1, 19),
    "pad_axes": ("Pad", [rand(2, 3, 4), ints(1, 2, 0, 1), None, ints(-1, 0)], {}, 1, 18),
    # reductions
    "reduce_mean_attr_axes": ("ReduceMean", [rand(2, 3, 4)], dict(axes=[0, -1]), 1, 13),
    "reduce_mean_input_axes": ("ReduceMean", [rand(2, 3, 4), ints(1)], dict(keepdims=0), 1, 18),
    "reduce_sum_input_axes": ("ReduceSum", [rand(2, 3, 4), ints(0, 2)], {}, 1, 13),
    "reduce_sum_all": ("ReduceSum", [rand(2, 3, 4)], dict(keepdims=0), 1, 13),
    "reduce_sum_noop": ("ReduceSum", [rand(2, 3, 4), np.zeros(0, np.int64)], dict(noop_with_empty_axes=1), 1, 13),
    "reduce_sum_int": ("ReduceSum", [Feed(np.arange(12, dtype=np.int32).reshape(3, 4)), ints(1)], {}, 1, 13),
    "reduce_max": ("ReduceMax", [rand(2, 3, 4)], dict(axes=[1]), 1, 13),
    "reduce_min": ("ReduceMin", [rand(2, 3, 4), ints(1, 2)], {}, 1, 18),
    "reduce_prod": ("ReduceProd", [rand(2, 3, 4)], dict(axes=[0, 2]), 1, 13),
    "reduce_l2": ("ReduceL2", [rand(2, 3, 4)], dict(axes=[2]), 1, 13),
    "reduce_l1": ("ReduceL1", [rand(2, 3, 4)], dict(axes=[2]), 1, 13),
    "reduce_log_sum_exp": ("ReduceLogSumExp", [rand(2, 3, 4)], dict(axes=[1], keepdims=0), 1, 13),
    "argmax_last": ("ArgMax", [Feed(np.array([[1, 3, 3], [2, 2, 0]], np.float32))],
                    dict(axis=1, select_last_index=1)),
    "argmin_keep0": ("ArgMin", [rand(3, 4)], dict(axis=0, keepdims=0)),
    "topk": ("TopK", [rand(3, 7), ints(3)], dict(axis=1), 2),
    "topk_smallest": ("TopK", [rand(5, 3), ints(2)], dict(axis=0, largest=0), 2),
    "cumsum_exclusive_reverse": ("CumSum", [rand(3, 4), ints(1)], dict(exclusive=1, reverse=1)),
    # shape and layout
    "reshape_zero_minus_one": ("Reshape", [rand(2, 3, 4), ints(0, -1, 2)], {}),
    "reshape_allowzero": ("Reshape", [rand(2, 3, 4), ints(4, 6)], dict(allowzero=1), 1, 14),
    "flatten_axis0": ("Flatten", [rand(2, 3, 4)], dict(axis=0)),
    "flatten_negative": ("Flatten", [rand(2, 3, 4, 5)], dict(axis=-1)),
    "squeeze_attr": ("Squeeze", [rand(1, 3, 1, 4)], dict(axes=[0, -2]), 1, 11),
    "squeeze_input": ("Squeeze", [rand(1, 3, 1, 4), ints(2)], {}, 1, 13),
    "squeeze_all": ("Squeeze", [rand(1, 3, 1, 4)], {}, 1, 13),
    "unsqueeze_attr": ("Unsqueeze", [rand(3, 4)], dict(axes=[0, 3]), 1, 11),
    "unsqueeze_input": ("Unsqueeze", [rand(3, 4), ints(-1, 1)], {}, 1, 13),
    "transpose_default": ("Transpose", [rand(2, 3, 4)], {}),
    "transpose_perm": ("Transpose", [rand(2, 3, 4)], dict(perm=[1, 2, 0])),
    "slice_negative_steps": ("Slice", [rand(5, 6, 7), ints(-1, 4, 1), ints(-100, 0, 1000), ints(0, 1, 2),
                                       ints(-2, -1, 3)], {}),
    "slice_clamped": ("Slice", [rand(5, 6), ints(2, -100), ints(1000, -2), ints(-2, 1)], {}),
    "slice_opset9": ("Slice", [rand(5, 6)], dict(starts=[1, -3], ends=[4, 100], axes=[0, 1]), 1, 9),
    "split_attr": ("Split", [rand(6, 4)], dict(axis=0, split=[1, 2, 3]), 3, 11),
    "split_input": ("Split", [rand(4, 6), ints(2, 4)], dict(axis=1), 2, 13),
    "split_equal": ("Split", [rand(4, 6)], dict(axis=1), 3, 13),
    "split_num_outputs": ("Split", [rand(4, 7)], dict(axis=1, num_outputs=3), 3, 18),
    "concat": ("Concat", [rand(2, 3), weight(2, 1), rand(2, 4, seed=3)], dict(axis=-1)),
    "expand": ("Expand", [rand(3, 1), ints(2, 1, 4)], {}),
    "tile": ("Tile", [rand(2, 3), ints(2, 3)], {}),
    "gather_negative": ("Gather", [rand(5, 4), Feed(np.array([[0, -1], [2, -5]], np.int64))], dict(axis=0)),
    "gather_axis1": ("Gather", [rand(3, 5, 2), Feed(np.array([4, 0, -2], np.int64))], dict(axis=1)),
    "gather_scalar": ("Gather", [rand(3, 5), np.array(-1, np.int64)], dict(axis=1)),
    "gather_int32_indices": ("Gather", [rand(6, 4), Feed(np.array([[1, 5]], np.int32))], {}),
    "gather_elements": ("GatherElements", [rand(3, 4), Feed(np.array([[0, -1, 2, 1], [3, 0, 0, 1]], np.int64))],
                        dict(axis=1)),
    "gather_nd": ("GatherND", [rand(2, 3, 4), Feed(np.array([[[0, 1], [1, 2]], [[1, 0], [0, -3]]], np.int64))], {}),
    "gather_nd_batch": ("GatherND", [rand(2, 3, 4), Feed(np.array([[[1], [2]], [[0], [-1]]], np.int64))],
                        dict(batch_dims=1)),
    "scatter_nd": ("ScatterND", [rand(4, 3), ints(1, 3).reshape(2, 1), weight(2, 3)], {}),
    "scatter_nd_add": ("ScatterND", [rand(4, 3), ints(1, 1, 0).reshape(3, 1), weight(3, 3)],
                       dict(reduction="add"), 1, 16),
    "scatter_nd_points": ("ScatterND", [rand(3, 4), ints(0, 1, 2, 3).reshape(2, 2), weight(2)], {}),
    "scatter_elements": ("ScatterElements", [rand(3, 4), ints(0, 2, 1, 0, 1, 1).reshape(2, 3), weight(2, 3)],
                         dict(axis=1)),
    "one_hot": ("OneHot", [Feed(np.array([[0, 2], [-1, 1]], np.int64)), ints(3),
                           np.array([-1.0, 2.0], np.float32)], dict(axis=1)),
    "non_zero": ("NonZero", [Feed(np.array([[1, 0, 2], [0, 0, 3]], np.float32))], {}),
    "trilu_lower": ("Trilu", [rand(4, 5), np.array(1, np.int64)], dict(upper=0), 1, 14),
    "trilu_upper": ("Trilu", [rand(2, 4, 5)], {}, 1, 14),
    "einsum": ("Einsum", [rand(2, 3, 4), rand(2, 4, 5, seed=3)], dict(equation="bij, bjk -> bik"), 1, 12),
    "range": ("Range", [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.7, np.float32)], {}),
    "constant_of_shape": ("ConstantOfShape", [ints(2, 3)],
                          dict(value=numpy_helper.from_array(np.array([7], np.int64)))),
    "depth_to_space_dcr": ("DepthToSpace", [rand(1, 8, 2, 3)], dict(blocksize=2)),
    "depth_to_space_crd": ("DepthToSpace", [rand(1, 8, 2, 3)], dict(blocksize=2, mode="CRD")),
    "space_to_depth": ("SpaceToDepth", [rand(1, 2, 4, 6)], dict(blocksize=2)),
    # elementwise, types
    "gemm_trans_alpha_beta": ("Gemm", [rand(4, 3), weight(5, 4), weight(1, 5)],
                              dict(transA=1, transB=1, alpha=0.5, beta=2.0)),
    "gemm_bias_column": ("Gemm", [rand(3, 4), weight(4, 5), weight(3, 1)], {}),
    "gemm_linear": ("Gemm", [rand(3, 4), weight(5, 4), weight(5)], dict(transB=1)),
    "gemm_no_bias": ("Gemm", [rand(3, 4), weight(4, 5)], dict(alpha=3.0)),
    "matmul_batched": ("MatMul", [rand(2, 1, 3, 4), weight(5, 4, 2)], {}),
    "softmax_opset11_flatten": ("Softmax", [rand(2, 3, 4)], dict(axis=1), 1, 11),
    "softmax_opset13": ("Softmax", [rand(2, 3, 4)], dict(axis=1), 1, 13),
    "log_softmax": ("LogSoftmax", [rand(2, 3, 4)], {}, 1, 13),
    "hardmax": ("Hardmax", [rand(2, 3, 4)], dict(axis=1), 1, 13),
    "clip_inputs": ("Clip", [rand(3, 4), np.array(-0.5, np.float32), np.array(0.3, np.float32)], {}),
    "clip_max_only": ("Clip", [rand(3, 4), None, np.array(0.3, np.float32)], {}),
    "div_int": ("Div", [NEG, np.array([2, -2, 4], np.int64)], {}),
    "mod_int": ("Mod", [NEG, np.array([2, -2, 4], np.int64)], {}),
    "mod_fmod": ("Mod", [rand(2, 3), np.array([0.7, -0.4, 1.1], np.float32)], dict(fmod=1)),
    "pow_int_exponent": ("Pow", [rand(2, 3), np.array(2, np.int64)], {}, 1, 15),
    "add_broadcast": ("Add", [rand(2, 1, 4), weight(3, 1)], {}),
    "cast_float_to_int": ("Cast", [HALVES], dict(to=TensorProto.INT32)),
    "cast_to_bool": ("Cast", [HALVES], dict(to=TensorProto.BOOL)),
    "round_half_even": ("Round", [HALVES], {}),
    "sign": ("Sign", [HALVES], {}),
    "where_equal": ("Where", [Feed(np.array([True, False, True])), rand(2, 3), np.float32(5.0)], {}),
    "less_or_equal": ("LessOrEqual", [HALVES, np.float32(0.5)], {}),
    "is_nan": ("IsNaN", [Feed(np.array([1.0, np.nan, np.inf], np.float32))], {}),
    "max_nary": ("Max", [rand(2, 3), weight(3), rand(1, 3, seed=4)], {}),
    "min_nary": ("Min", [rand(2, 3), weight(3)], {}),
    "sum_nary": ("Sum", [rand(2, 3), weight(3), weight(2, 1, seed=5)], {}),
    "mean_nary": ("Mean", [rand(2, 3), weight(3), weight(2, 1, seed=5)], {}),
    "prelu_channel": ("PRelu", [rand(2, 3, 4, 4), weight(3, 1, 1)], {}),
    "leaky_relu": ("LeakyRelu", [rand(3, 4)], dict(alpha=0.2)),
    "hard_sigmoid": ("HardSigmoid", [rand(3, 4)], dict(alpha=0.3, beta=0.4)),
    "hard_swish": ("HardSwish", [rand(3, 4)], {}),
    "elu": ("Elu", [rand(3, 4)], dict(alpha=0.7)),
    "selu": ("Selu", [rand(3, 4)], {}),
    "celu": ("Celu", [rand(3, 4)], dict(alpha=1.5), 1, 12),
    "gelu_tanh": ("Gelu", [rand(3, 4)], dict(approximate="tanh"), 1, 20),
    "mish": ("Mish", [rand(3, 4)], {}, 1, 18),
    "softplus": ("Softplus", [rand(3, 4)], {}),
    "erf": ("Erf", [rand(3, 4)], {}),
    "and_or_not": ("And", [Feed(np.array([True, False, True])), np.array([True, True, False])], {}),
    "dropout_mask": ("Dropout", [rand(3, 4)], {}, 2),
    "shape_start_end": ("Shape", [rand(2, 3, 4, 5)], dict(start=1, end=-1), 1, 15),
    "size": ("Size", [rand(2, 3, 4)], {}),
    "cast_like": ("CastLike", [HALVES, np.array([1], np.int64)], {}, 1, 15),
    "is_inf_positive": ("IsInf", [Feed(np.array([1.0, -np.inf, np.inf], np.float32))], dict(detect_negative=0)),
    "xor": ("Xor", [Feed(np.array([True, False, True])), np.array([True, True, False])], {}),
    "thresholded_relu": ("ThresholdedRelu", [rand(3, 4)], dict(alpha=0.3)),
    "shrink": ("Shrink", [rand(3, 4)], dict(bias=0.1, lambd=0.4)),
    "softsign": ("Softsign", [rand(3, 4)], {}),
    "constant_of_shape_default": ("ConstantOfShape", [Feed(np.array([2, 3], np.int64))], {}),
    "range_int": ("Range", [np.array(10, np.int64), np.array(-3, np.int64), np.array(-4, np.int64)], {}),
    "reduce_sum_square": ("ReduceSumSquare", [rand(2, 3, 4)], dict(axes=[1]), 1, 13),
    "reduce_log_sum": ("ReduceLogSum", [Feed(np.abs(weight(2, 3, 4)) + 0.1)], dict(axes=[0, 2]), 1, 13),
    "scatter_nd_mul": ("ScatterND", [rand(4, 3), ints(3, 0).reshape(2, 1), weight(2, 3)],
                       dict(reduction="mul"), 1, 16),
    "scatter_elements_add": ("ScatterElements", [rand(3, 4), ints(0, 0, 1, 2, 2, 2).reshape(2, 3), weight(2, 3)],
                             dict(axis=1, reduction="add"), 1, 16),
    "upsample_nearest_opset9": ("Upsample", [rand(1, 2, 3, 4), np.array([1, 1, 2.5, 1.5], np.float32)],
                                dict(mode="nearest"), 1, 9),
    "resize_nearest_ceil_half_pixel_symmetric": ("Resize", [rand(1, 2, 5, 4), None,
                                                            np.array([1, 1, 1.7, 0.6], np.float32)],
                                                 dict(mode="nearest", nearest_mode="ceil",
                                                      coordinate_transformation_mode="half_pixel_symmetric"), 1, 19),
    "resize_linear_half_pixel_symmetric": ("Resize", [rand(1, 2, 5, 4), None, np.array([1, 1, 1.7, 2.2], np.float32)],
                                           dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"),
                                           1, 19),
    "cumsum_plain": ("CumSum", [Feed(np.arange(12, dtype=np.int32).reshape(3, 4)), np.array(0, np.int32)], {}),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_matches_onnxruntime(case):
    op_type, inputs, attrs, *rest = OP_CASES[case]
    outputs = rest[0] if rest else 1
    opset = rest[1] if len(rest) > 1 else 17
    model, feeds = one_op(op_type, inputs, attrs, outputs, opset)
    assert_matches(model, feeds)


# --- control flow and errors ---------------------------------------------------------------------

def if_model():
    """y = If(cond, then: relu(conv(x)) + 1, else: -conv(x)); the branches read outer tensors."""
    b = GraphBuilder(opset=17)
    x = b.input("x", [1, 3, 6, 6])
    cond = b.input("cond", [], TensorProto.BOOL)
    h = b.conv(x, 3, 4, name="conv")
    one = b.floats([1.0], "one")
    then_out = helper.make_tensor_value_info("t_out", F32, None)
    then = helper.make_graph([helper.make_node("Relu", [h], ["t_relu"]),
                              helper.make_node("Add", ["t_relu", one], ["t_out"])], "then", [], [then_out])
    els = helper.make_graph([helper.make_node("Neg", [h], ["e_out"])], "else", [],
                            [helper.make_tensor_value_info("e_out", F32, None)])
    b.nodes.append(helper.make_node("If", [cond], ["y"], name="if", then_branch=then, else_branch=els))
    return b.build("y", check=False)


@pytest.mark.parametrize("cond", [True, False])
def test_if_runs_the_chosen_branch_with_outer_values(cond):
    model = if_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32), "cond": np.array(cond)}
    assert_matches(model, feeds)
    tg = TorchGraph(model)
    y, = tg(torch.from_numpy(feeds["x"]), torch.tensor(cond))
    y.sum().backward()
    assert tg.parameter("conv.W").grad is not None  # gradients cross the branch


def test_missing_ops_are_listed_in_one_line():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Det", ["r"], ["d"], name="det"),
             helper.make_node("FancyOp", ["d"], ["f"], name="fancy", domain="com.example"),
             helper.make_node("Unique", ["r"], ["l"], name="unique")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 2])],
                              [helper.make_tensor_value_info(n, F32, None) for n in ("f", "l")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModel) as info:
        TorchGraph(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("no PyTorch implementation for op")
    for part in ("Det (node det)", "com.example.FancyOp (node fancy)", "Unique (node unique)"):
        assert part in message


def test_model_local_functions_are_inlined():
    body = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "s"], ["y"])]
    scaled_relu = helper.make_function("local", "ScaledRelu", ["x", "s"], ["y"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ScaledRelu", ["h", "s"], ["y"], domain="local")]
    weights = [numpy_helper.from_array(weight(4, 3), "w"), numpy_helper.from_array(weight(3, seed=2), "s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 4])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])], weights)
    model = helper.make_model(graph, functions=[scaled_relu],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    assert_matches(model, {"x": weight(2, 4, seed=3)})
    assert sorted(TorchGraph(model).param_names.values()) == ["s", "w"]


def test_unimplemented_attribute_is_reported_at_construction():
    model, _ = one_op("Resize", [rand(1, 2, 4, 4), None, np.array([1, 1, 0.5, 0.5], np.float32)],
                      dict(mode="linear", antialias=1), 1, 18)
    with pytest.raises(UnsupportedModel, match="antialias"):
        TorchGraph(model)


def test_external_data_not_loaded_is_a_clear_error(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [2, 64])
    model = b.build(b.matmul(x, 64, 64, name="mm"))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    with pytest.raises(UnsupportedModel, match="external file that was not loaded"):
        TorchGraph(onnx.load(tmp_path / "m.onnx", load_external_data=False))
    loaded = onnx.load(tmp_path / "m.onnx")
    tg = TorchGraph(loaded)
    with torch.no_grad():
        tg.parameter("mm.W").mul_(2)
    written = tg.write_back(loaded)
    assert not any(uses_external(t) for t in written.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[0]),
                                  tg.parameter("mm.W").detach().numpy())


def uses_external(t):
    return t.data_location == TensorProto.EXTERNAL


# --- running: inputs, intermediates, modes ------------------------------------------------------------

def small_cnn():
    b = GraphBuilder()
    x = b.input("x", ["batch", 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")], name="relu1")
    h = b.op("MaxPool", [h], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.bn(b.conv(h, 8, 8, name="conv2"), 8, name="bn")], name="relu2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="gap")], name="flat")
    return b.build(b.gemm(h, 8, 5, name="fc", trans_b=1))


def test_run_returns_intermediates_and_needs_only_their_inputs():
    model = small_cnn()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    wanted = ["relu1_out", "pool_out", "bn_out", "fc_out"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_value_info(n, onnx.TypeProto()) for n in wanted[:3])
    ref = dict(zip([o.name for o in probe.graph.output], ort_run(probe, feeds)))
    tg = TorchGraph(model)
    got = torch_run(tg, feeds, wanted)
    for name, value in zip(wanted, got):
        assert rel_err(ref[name], value) <= 1e-5, name
    # A tensor that depends on no graph input needs no feeds: nothing past it runs.
    assert list(tg.run({}, ["conv1.W"])) == ["conv1.W"]
    with pytest.raises(UsageError, match="missing graph input 'x'"):
        tg.run({}, ["relu1_out"])
    with pytest.raises(UsageError, match="no tensor named 'nope'"):
        tg.run(feeds, ["nope"])


def test_call_by_name_and_dynamic_batch():
    model = small_cnn()
    tg = TorchGraph(model)
    x = torch.randn(5, 3, 8, 8)
    by_position, = tg(x)
    by_name, = tg(x=x)
    assert by_position.shape == (5, 5)
    torch.testing.assert_close(by_position, by_name)
    with pytest.raises(UsageError, match="takes 1 inputs"):
        tg(x, x)


def test_module_conversions_follow_torch():
    model = small_cnn()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = ort_run(model, feeds)[0]
    tg = TorchGraph(model).double()
    out, = tg(torch.from_numpy(feeds["x"]).double())
    assert out.dtype == torch.float64 and rel_err(ref, out.detach().numpy()) <= 1e-5
    assert [n for n, _ in tg.named_parameters()] == list(tg.param_names)
    assert set(tg.state_dict()) == set(tg.param_names)  # constants are not state


def test_trainable_filter_and_param_names():
    model = small_cnn()
    tg = TorchGraph(model, trainable=lambda name: name.startswith("fc."))
    onnx_names = {t.name for t in model.graph.initializer}
    assert set(tg.param_names.values()) == onnx_names
    for torch_name, onnx_name in tg.param_names.items():
        p = dict(tg.named_parameters())[torch_name]
        assert p is tg.parameter(onnx_name)
        assert p.requires_grad == onnx_name.startswith("fc.")
    with pytest.raises(KeyError):
        tg.parameter("no.such.tensor")


# --- gradients ----------------------------------------------------------------------------------------

def weight_params(model, tg):
    """ONNX names of the parameters that are Conv/ConvTranspose/Gemm/MatMul weights (through Identity)."""
    routed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            for name in node.input[:2]:
                name = routed.get(name, name)
                if name in set(tg.param_names.values()):
                    names.add(name)
    return names


def assert_gradients_reach_weights(model, tg, *inputs):
    outs = tg(*inputs)
    sum(o.float().square().mean() for o in outs if o.is_floating_point()).backward()
    weights = weight_params(model, tg)
    assert weights
    for name in weights:
        grad = tg.parameter(name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), f"no gradient for {name}"


def test_gradients_reach_every_weight_including_bn_statistics():
    model = small_cnn()
    tg = TorchGraph(model)
    assert_gradients_reach_weights(model, tg, torch.randn(4, 3, 8, 8))
    for name in ("bn.scale", "bn.shift", "bn.mean", "bn.var"):
        assert tg.parameter(name).grad is not None, name
    # The path that spells BatchNormalization out for gradients computes what onnxruntime does...
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    with_grad, = tg(torch.from_numpy(feeds["x"]))
    assert rel_err(ort_run(model, feeds)[0], with_grad.detach().numpy()) <= 1e-5
    # ...and its gradients are right (finite differences, float64).
    tg.double()
    bn_params = [tg.parameter(n) for n in ("bn.scale", "bn.mean", "bn.var")]
    x = torch.from_numpy(feeds["x"]).double()
    assert torch.autograd.gradcheck(lambda *ps: _with_values(tg, bn_params, ps, x), bn_params)


def _with_values(tg, params, values, x):
    """tg(x) with ``params`` temporarily replaced by ``values`` (for gradcheck)."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        return tg(x)[0]
    finally:
        for p, s in zip(params, saved):
            p.data = s


def test_bundled_digits_model_trains():
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    tg = TorchGraph(model)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    assert_gradients_reach_weights(model, tg, x)
    opt = torch.optim.SGD(tg.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tg(x)[0], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- write-back -------------------------------------------------------------------------------------

def test_write_back_without_changes_is_byte_identical():
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    before = model.SerializeToString()
    written = TorchGraph(model).write_back(model)
    assert written is not model and written.SerializeToString() == before


def test_write_back_round_trip():
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    before = model.SerializeToString()
    tg = TorchGraph(model)
    changed = next(n.input[1] for n in model.graph.node if n.op_type == "Gemm")
    with torch.no_grad():
        tg.parameter(changed).mul_(1.5).add_(0.01)
    written = tg.write_back(model)
    assert model.SerializeToString() == before  # the input model is not modified
    old = {t.name: t for t in model.graph.initializer}
    for t in written.graph.initializer:
        assert (t.SerializeToString() == old[t.name].SerializeToString()) == (t.name != changed), t.name
        assert t.data_type == old[t.name].data_type and list(t.dims) == list(old[t.name].dims)
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ours, = tg(torch.from_numpy(x))
    assert rel_err(ort_run(written, {"input": x})[0], ours.numpy()) <= 1e-5
    assert rel_err(ort_run(model, {"input": x})[0], ours.numpy()) > 1e-3


def test_shared_initializer_is_one_parameter():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    w, bias = b.weight((4, 4, 3, 3), "shared.W"), b.weight((4,), "shared.B")
    routed = b.op("Identity", [bias], name="route")  # the torch exporter routes tied weights like this
    h = b.op("Relu", [b.conv(x, 4, 4, name="c1", w=w, b=bias)])
    model = b.build(b.conv(h, 4, 4, name="c2", w=w, b=routed))
    tg = TorchGraph(model)
    assert sorted(tg.param_names.values()) == ["shared.B", "shared.W"]
    out, = tg(torch.randn(1, 4, 6, 6))
    out.sum().backward()
    assert tg.parameter("shared.W").grad is not None and tg.parameter("shared.B").grad is not None
    with torch.no_grad():
        tg.parameter("shared.W").mul_(-1)
    written = tg.write_back(model)
    assert [t.name for t in written.graph.initializer] == [t.name for t in model.graph.initializer]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    assert rel_err(ort_run(written, feeds)[0], torch_run(tg, feeds)[0]) <= 1e-5


def test_float16_model_stays_float16():
    h16 = TensorProto.FLOAT16
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float16), "w")
    bias = numpy_helper.from_array(rng.standard_normal(6).astype(np.float16), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["add"]),
             helper.make_node("Relu", ["add"], ["y"])]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", h16, [3, 8])],
                              [helper.make_tensor_value_info("y", h16, [3, 6])], [w, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tg = TorchGraph(model)
    assert tg.parameter("w").dtype == torch.float16
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float16)}
    out = torch_run(tg, feeds)[0]
    assert out.dtype == np.float16 and rel_err(ort_run(model, feeds)[0], out) <= 2e-3
    with torch.no_grad():
        tg.parameter("w").add_(0.25)
    written = tg.write_back(model)
    assert [t.data_type for t in written.graph.initializer] == [h16, h16]
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[0]),
                                  tg.parameter("w").detach().numpy())


def test_bfloat16_parameters_round_trip():
    bf16 = TensorProto.BFLOAT16
    w = helper.make_tensor("w", bf16, [3], [1.5, -2.0, 0.25])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "bf16",
                              [helper.make_tensor_value_info("x", bf16, [2, 3])],
                              [helper.make_tensor_value_info("y", bf16, [2, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tg = TorchGraph(model)
    p = tg.parameter("w")
    assert p.dtype == torch.bfloat16 and p.tolist() == [1.5, -2.0, 0.25]
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    torch.testing.assert_close(tg(x)[0], x * p)
    assert tg.write_back(model).SerializeToString() == model.SerializeToString()
    with torch.no_grad():
        p.mul_(2)
    written = tg.write_back(model).graph.initializer[0]
    assert written.data_type == bf16
    assert tensor_from_proto(written).tolist() == [3.0, -4.0, 0.5]


def paddle_style_model():
    """Weights as Constant nodes (paddle2onnx), plus a scalar Constant that is a coefficient."""
    rng = np.random.default_rng(0)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name))

    nodes = [
        constant("conv_w", rng.standard_normal((4, 3, 3, 3))), constant("conv_b", rng.standard_normal(4)),
        constant("chan_bias", rng.standard_normal((1, 4, 1, 1))), constant("half", np.array(0.5)),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "chan_bias"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", F32, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", F32, [1, 4, 5, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_constant_node_weights_are_parameters_and_written_back():
    model = paddle_style_model()
    tg = TorchGraph(model)
    assert sorted(tg.param_names.values()) == ["chan_bias", "conv_b", "conv_w"]  # not the 0.5
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)}
    out, = tg(torch.from_numpy(feeds["x"]))
    out.sum().backward()
    assert all(tg.parameter(n).grad is not None for n in ("conv_w", "conv_b", "chan_bias"))
    with torch.no_grad():
        tg.parameter("conv_w").mul_(2)
        tg.parameter("chan_bias").add_(1)
    written = tg.write_back(model)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    assert rel_err(ort_run(written, feeds)[0], torch_run(tg, feeds)[0]) <= 1e-5


# --- zoo models and transformers -----------------------------------------------------------------------

FAST_ZOO = [("resnet18", "legacy"), ("mobilenet_v3_small", "legacy"), ("squeezenet1_0", "legacy"),
            ("shufflenet_v2_x1_0", "legacy"), ("efficientnet_b0", "legacy")]
SLOW_ZOO = ([(m, "legacy") for m in zoo.LEGACY_MODELS if (m, "legacy") not in FAST_ZOO]
            + [(m, "dynamo") for m in zoo.DYNAMO_MODELS])
ZOO_CASES = ([pytest.param(m, e, id=f"{m}-{e}") for m, e in FAST_ZOO]
             + [pytest.param(m, e, id=f"{m}-{e}", marks=pytest.mark.slow) for m, e in SLOW_ZOO])


def image_feed(model, batch=1):
    size = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    return {model.graph.input[0].name: x}


@pytest.mark.parametrize("name, exporter", ZOO_CASES)
def test_zoo_model_matches_onnxruntime(name, exporter):
    model = onnx.load(zoo.export(name, exporter))
    feeds = image_feed(model)
    ref = ort_run(model, feeds)
    got = torch_run(TorchGraph(model).eval(), feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    assert max(rel_err(r, g) for r, g in zip(ref, got)) <= 1e-4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_zoo_gradients_reach_every_weight(name):
    model = onnx.load(zoo.export(name, "legacy"))
    tg = TorchGraph(model).train()
    assert_gradients_reach_weights(model, tg, torch.from_numpy(image_feed(model)[model.graph.input[0].name]))


@pytest.mark.slow
def test_zoo_shared_initializer_round_trip():
    """Freshly initialised resnet18: the legacy exporter shares one zero initializer among BN biases."""
    model = onnx.load(zoo.export("resnet18", "legacy", fresh=True))
    tg = TorchGraph(model)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    shared = [n for n in tg.param_names.values() if consumers.get(n, 0) > 1]
    assert shared, "expected a shared initializer in the fresh export"
    assert len(tg.param_names) == len({t.name for t in model.graph.initializer})
    with torch.no_grad():
        tg.parameter(shared[0]).add_(0.5)
    written = tg.write_back(model)
    assert len(written.graph.initializer) == len(model.graph.initializer)
    feeds = image_feed(model)
    assert rel_err(ort_run(written, feeds)[0], torch_run(tg, feeds)[0]) <= 1e-4


class _HiddenStates(torch.nn.Module):
    """(input_ids, attention_mask) -> last hidden state; plain tensors in and out for the exporters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _transformer(name):
    import transformers

    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                         intermediate_size=128)
        return transformers.BertModel(config).eval()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, use_cache=False)
    return transformers.GPT2Model(config).eval()


TRANSFORMER_INPUTS = (np.random.default_rng(0).integers(0, 1000, (2, 8)).astype(np.int64),
                      np.array([[1] * 8, [1] * 5 + [0] * 3], np.int64))  # the second row is padded


@pytest.fixture(scope="module")
def transformer_export(tmp_path_factory):
    made = {}

    def export(name, exporter):
        if (name, exporter) not in made:
            pytest.importorskip("transformers")
            path = tmp_path_factory.mktemp("hf") / f"{name}-{exporter}.onnx"
            args = tuple(torch.from_numpy(a) for a in TRANSFORMER_INPUTS)
            kwargs = dict(opset_version=17) if exporter == "legacy" else dict(external_data=False)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(_HiddenStates(_transformer(name)), args, str(path), dynamo=exporter == "dynamo",
                                  input_names=["input_ids", "attention_mask"], **kwargs)
            made[name, exporter] = onnx.load(path)
        return made[name, exporter]
    return export


TRANSFORMER_CASES = [pytest.param(n, e, id=f"{n}-{e}", marks=[pytest.mark.slow] if e == "dynamo" else [])
                     for n in ("bert", "gpt2") for e in ("legacy", "dynamo")]


@pytest.mark.parametrize("name, exporter", TRANSFORMER_CASES)
def test_transformer_matches_onnxruntime_and_trains(transformer_export, name, exporter):
    model = transformer_export(name, exporter)
    feeds = dict(zip([i.name for i in model.graph.input], TRANSFORMER_INPUTS))
    tg = TorchGraph(model)
    ref = ort_run(model, feeds)
    assert max(rel_err(r, g) for r, g in zip(ref, torch_run(tg, feeds))) <= 1e-4
    assert_gradients_reach_weights(model, tg, *(torch.from_numpy(a) for a in TRANSFORMER_INPUTS))
