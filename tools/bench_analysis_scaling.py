"""Analysis time against node count: it should grow linearly (issue 18, point 6).

    python -m tools.bench_analysis_scaling                 # 10k and 100k nodes
    python -m tools.bench_analysis_scaling --nodes 1000,10000

Each model is a chain of residual blocks, Conv 1x1 (4 -> 4 channels) -> Relu ->
Add(skip), on a 1x4x4x4 input: every block adds a group coupled with the
residual stream, so the analysis propagates channel facts through every node
(a plain chain of independent convs would be easier). The weights are tiny,
so the time is the analysis's own, not the data's. Printed per size: nodes,
CPU seconds of ``onnxprune.analyse`` (the best of ``--repeat``; CPU time, so
that other work on a shared machine does not count), microseconds per
node and the ratio of that to the smallest size's (1.0 = linear).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def residual_chain(nodes: int, channels: int = 4) -> onnx.ModelProto:
    """A model of about ``nodes`` nodes: blocks of Conv -> Relu -> Add(skip)."""
    rng = np.random.default_rng(0)
    graph_nodes, inits, x = [], [], "x"
    for i in range(max(1, nodes // 3)):
        w = numpy_helper.from_array(rng.standard_normal((channels, channels, 1, 1)).astype(np.float32), f"w{i}")
        inits.append(w)
        graph_nodes += [
            helper.make_node("Conv", [x, w.name], [f"c{i}"], name=f"conv{i}"),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Add", [f"r{i}", x], [f"a{i}"], name=f"add{i}"),
        ]
        x = f"a{i}"
    graph = helper.make_graph(
        graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_analysis(model: onnx.ModelProto, repeat: int) -> float:
    from onnxprune import analyse

    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()  # CPU time: other processes on the machine do not count
        analyse(model)
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10000,100000", help="comma-separated node counts")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (the best is kept)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    first = None
    print(f"{'nodes':>8} {'cpu s':>9} {'us/node':>9} {'vs first':>9}")
    for n in sizes:
        model = residual_chain(n)
        seconds = time_analysis(model, args.repeat)
        per_node = seconds / len(model.graph.node) * 1e6
        first = first or per_node
        print(f"{len(model.graph.node):>8} {seconds:>9.2f} {per_node:>9.1f} {per_node / first:>9.2f}")


if __name__ == "__main__":
    main()
