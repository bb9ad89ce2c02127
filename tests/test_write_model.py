"""Writing a model one initializer at a time (model/publish.write_model): the file parses to the
same model as onnx's own serialisation, runs the same in onnxruntime, and the staged write and
the prune command's output load back whole."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.errors import VerificationFailed
from onnxprune.model.publish import Staging, write_model

from graphs import assert_close, make_feeds, run, run_main, small_cnn, write_mlp


def _written(model: onnx.ModelProto) -> onnx.ModelProto:
    buffer = io.BytesIO()
    write_model(buffer, model)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(buffer.getvalue())
    return parsed


def test_same_model_and_size_as_serialising_it_whole():
    model = small_cnn()
    model.metadata_props.add(key="k", value="v")
    model.doc_string = "doc"
    model.graph.doc_string = "graph doc"
    written = _written(model)
    assert written == model
    assert written.ByteSize() == len(model.SerializeToString())
    feeds = make_feeds(model)
    assert_close(run(model, feeds), run(written, feeds), tol=0)


def test_functions_sparse_initializers_and_external_references_kept():
    model = small_cnn()
    model.functions.append(helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                                [helper.make_opsetid("", 17)]))
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "s"),
                                       numpy_helper.from_array(np.array([0], np.int64)), [4])
    model.graph.sparse_initializer.append(sparse)
    external = onnx.TensorProto(name="ext", data_type=onnx.TensorProto.FLOAT, dims=[2],
                                data_location=onnx.TensorProto.EXTERNAL)
    external.external_data.add(key="location", value="w.data")
    model.graph.initializer.append(external)
    assert _written(model) == model


def test_large_weights_of_every_width_written_as_serialising_them_whole():
    """Weights over a MiB are written with their size taken from their dims (publish._encoded_size):
    the file is the model's own encoding for 4-bit, 16-bit, 32-bit and 64-bit types alike."""
    model = small_cnn()
    rng = np.random.default_rng(0)
    for name, dtype in (("f32", np.float32), ("f16", np.float16), ("i64", np.int64)):
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((600, 700)).astype(dtype), name))
    packed = onnx.TensorProto(name="i4", data_type=onnx.TensorProto.INT4, dims=[2_100_001],
                              raw_data=rng.integers(0, 255, 1_050_001, dtype=np.uint8).tobytes())
    model.graph.initializer.append(packed)
    model.graph.initializer[-1].doc_string = "a field beside the raw data"
    buffer = io.BytesIO()
    write_model(buffer, model)
    assert _written(model) == model  # the same fields (in another order: the weights after the graph's rest)
    assert len(buffer.getvalue()) == model.ByteSize()


def test_a_weight_whose_data_its_dims_contradict_is_not_written():
    """The size written ahead of a large weight comes from its dims: one holding other data would
    make a file that does not parse, so it is refused (verification's exit, nothing published)."""
    model = small_cnn()
    model.graph.initializer.append(onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1 << 19],
                                                    raw_data=bytes((1 << 21) + 4)))
    with pytest.raises(VerificationFailed, match="'w' holds 2097156 bytes.*need 2097152"):
        write_model(io.BytesIO(), model)


def test_graph_without_initializers():
    model = small_cnn()
    del model.graph.initializer[:]
    assert _written(model) == model


def test_staged_file_loads_back(tmp_path):
    model = small_cnn()
    with Staging(force=False) as stage:
        staged = stage.model(tmp_path / "m.onnx", model)
        assert onnx.load(str(staged)) == model
    assert onnx.load(str(tmp_path / "m.onnx")) == model


def test_pruned_file_is_whole_and_runs(tmp_path, capsys):
    source = tmp_path / "mlp.onnx"
    write_mlp(source, 64, 3)
    out = tmp_path / "out.onnx"
    code, _, err = run_main(capsys, str(source), "--structured", "0.5", "-o", str(out))
    assert code == 0, err
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert out.stat().st_size == len(pruned.SerializeToString())
    assert len(pruned.graph.initializer) == len(onnx.load(str(source)).graph.initializer)
    feeds = make_feeds(pruned)
    assert run(pruned, feeds)[0].shape == run(onnx.load(str(source)), feeds)[0].shape
