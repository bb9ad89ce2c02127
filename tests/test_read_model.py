"""Reading a model one initializer at a time (model/stream.py): the same model as onnx.load, the
weights left out or read one by one where asked, garbage refused in one line, and a large model
read with about one copy of its weights in memory (onnx.load holds two)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.model.load import read_model
from onnxprune.model.publish import write_model
from onnxprune.model.stream import SMALL_FIELD, large_initializers, read_model_file, read_model_metadata

from graphs import small_cnn


def _with_large_weight(model: onnx.ModelProto, elements: int = 1 << 19) -> onnx.ModelProto:
    """``model`` with one more initializer of ``elements`` float32 (2 MiB: past every threshold)."""
    values = np.arange(elements, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(values, "big"))
    return model


def _rich_model() -> onnx.ModelProto:
    model = _with_large_weight(small_cnn())
    model.metadata_props.add(key="k", value="v")
    model.doc_string = "doc"
    model.functions.append(helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                                [helper.make_opsetid("", 17)]))
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "s"),
                                       numpy_helper.from_array(np.array([0], np.int64)), [4])
    model.graph.sparse_initializer.append(sparse)
    return model


def test_the_same_model_as_onnx_load(tmp_path):
    model = _rich_model()
    onnx.save(model, tmp_path / "m.onnx")
    read = read_model_file(tmp_path / "m.onnx")
    assert read == onnx.load(tmp_path / "m.onnx") == model


def test_a_file_written_a_weight_at_a_time_reads_back(tmp_path):
    """publish.write_model writes a large weight's raw bytes apart from the rest of its tensor."""
    model = _rich_model()
    with open(tmp_path / "m.onnx", "wb") as f:
        write_model(f, model)
    assert onnx.load(tmp_path / "m.onnx") == model
    assert read_model_file(tmp_path / "m.onnx") == model


def test_external_data_is_loaded_or_left(tmp_path):
    model = _with_large_weight(small_cnn())
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=1024)
    assert read_model_file(tmp_path / "m.onnx") == onnx.load(tmp_path / "m.onnx")
    assert read_model_file(tmp_path / "m.onnx", load_external_data=False) == onnx.load(
        tmp_path / "m.onnx", load_external_data=False)


def test_metadata_leaves_out_only_the_large_inline_weights(tmp_path):
    model = _rich_model()
    onnx.save(model, tmp_path / "m.onnx")
    meta = read_model_metadata(tmp_path / "m.onnx")
    large = list(large_initializers(tmp_path / "m.onnx"))
    assert [t.name for t in large] == ["big"]
    assert large[0] == model.graph.initializer[-1]
    assert [t.name for t in meta.graph.initializer] == [t.name for t in model.graph.initializer[:-1]]
    assert all(t.ByteSize() <= SMALL_FIELD for t in meta.graph.initializer)
    assert meta.graph.node == model.graph.node and meta.functions == model.functions


def test_a_subgraph_weight_stays_with_its_node(tmp_path):
    """Only the main graph's initializers are read apart: an If branch's travel with the If node."""
    big = numpy_helper.from_array(np.ones(1 << 19, np.float32), "branch_w")
    branch = helper.make_graph([helper.make_node("Identity", ["branch_w"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1 << 19])], [big])
    cond = helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
                              [cond], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1 << 19])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    assert read_model_file(tmp_path / "m.onnx") == model
    assert read_model_metadata(tmp_path / "m.onnx") == model


@pytest.mark.parametrize("data", [b"\x00" * 64, b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"not a model at all"])
def test_garbage_is_refused_in_one_line(tmp_path, data):
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(onnxprune.errors.InvalidModel) as caught:
        read_model(path)
    assert "\n" not in str(caught.value)


def test_a_truncated_model_is_refused(tmp_path):
    onnx.save(_rich_model(), tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) - 1000])
    with pytest.raises(onnxprune.errors.InvalidModel, match="not a readable ONNX protobuf"):
        read_model(tmp_path / "cut.onnx")


def test_reading_a_large_model_holds_one_copy_of_its_weights(tmp_path):
    """128 MiB of weights: onnx.load peaks at about twice that above the interpreter, the streamed
    read at about once (the model, and one weight's encoding at a time)."""
    weights = [numpy_helper.from_array(np.full((1 << 23,), i, np.float32), f"w{i}") for i in range(4)]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1 << 23])
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(4)]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y3", onnx.TensorProto.FLOAT, [1 << 23])],
                              weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    script = textwrap.dedent(f"""
        import onnx
        from onnxprune.model.stream import read_model_file

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        before = hwm()
        model = {{reader}}(r"{tmp_path / 'm.onnx'}")
        print(hwm() - before)
    """)
    grown = {}
    for reader in ("read_model_file", "onnx.load"):
        out = subprocess.run([sys.executable, "-c", script.replace("{reader}", reader)], capture_output=True,
                             text=True, check=True)
        grown[reader] = int(out.stdout.split()[-1])
    size = 128 << 20
    assert grown["read_model_file"] < 1.3 * size, grown
    assert grown["onnx.load"] > 1.7 * size, grown  # what the streamed read saves
