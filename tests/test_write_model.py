"""Writing a model one initializer at a time (model/publish.write_model): the file parses to the
same model as onnx's own serialisation, runs the same in onnxruntime, and the staged write and
the prune command's output load back whole."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
