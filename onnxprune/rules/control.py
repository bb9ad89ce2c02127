"""If, Loop and Scan: what their subgraphs' inputs and outputs are of their own.

A link's side may name a subgraph: "then_branch" is that branch's outputs,
"body:in" the body's inputs; the grower visits the node from them
(analysis/groups.py), and channels reach the subgraphs' nodes along the
outer tensors they read.

If: result i is output i of whichever branch runs, so its channels are those
of output i of both branches: one group, cut alike whichever branch runs (a
branch whose output cannot be cut blocks both). The condition carries no
channels.

Loop: carried value j is the same tensor in four places, its initial value
(input 2 + j), the body's input 2 + j and output 1 + j, and the final value
(output j); scan output k of the body (output 1 + N + k) is stacked along a
new first axis of the node's output N + k. The trip count, the condition and
the iteration number carry none.

Scan: state j likewise (input j, body input and output j, output j); scan
input m is sliced along its scan axis into the body's input N + m, and the
body's scan output k is stacked along its scan output axis into output
N + k: the other axes map across, the scan axis carries no channels.
"""

from __future__ import annotations

from .registry import Link, Reached, barrier, related, rule

BRANCHES = ("then_branch", "else_branch")


@rule("If")
def if_results(node, view, r: Reached):
    if r.side == "in":
        return barrier("channels reach the condition")
    return related(Link("out", r.index, r.axis, r.owner),
                   *(Link(branch, r.index, r.axis, r.owner) for branch in BRANCHES))


def _carried(j: int, axis: int, owner, first_input: int, body_input: int, body_output: int) -> list[Link]:
    """The four places of one carried value (Loop) or state (Scan)."""
    return [Link("in", first_input + j, axis, owner), Link("body:in", body_input + j, axis, owner),
            Link("body", body_output + j, axis, owner), Link("out", j, axis, owner)]


@rule("Loop")
def loop(node, view, r: Reached):
    carried = len(node.inputs) - 2
    where = {"in": r.index - 2, "body:in": r.index - 2, "body": r.index - 1, "out": r.index}[r.side]
    if where < 0:
        return barrier("channels reach the trip count or the condition")
    if where < carried:
        return related(*_carried(where, r.axis, r.owner, 2, 2, 1))
    k = where - carried  # a scan output: the body's value at every iteration, stacked on a new axis 0
    if r.side == "body":
        return related(Link("out", carried + k, r.axis + 1, r.owner))
    if r.axis == 0:
        return barrier("channels reach the iteration axis of a scan output")
    return related(Link("body", 1 + carried + k, r.axis - 1, r.owner))


def _scan_axis(node, name: str, k: int, rank: int | None) -> int | None:
    axes = node.attrs.get(name)
    axis = int(axes[k]) if axes is not None and k < len(axes) else 0
    return axis + rank if axis < 0 and rank is not None else axis


@rule("Scan")
def scan(node, view, r: Reached):
    if view.opset < 9:
        return barrier("opset 8 Scan (with a batch axis)")
    count = int(node.attrs.get("num_scan_inputs", 0))
    states = len(node.inputs) - count
    if r.index < states:  # inputs, body inputs, body outputs and outputs all start with the states
        return related(*_carried(r.index, r.axis, r.owner, 0, 0, 0))
    k = r.index - states
    if r.side in ("in", "body:in"):  # scan input k, sliced along its axis into the body's input
        axis = _scan_axis(node, "scan_input_axes", k, view.rank(node.inputs[r.index]))
        if r.side == "in":
            return barrier("channels reach the scan axis") if r.axis == axis else \
                related(Link("body:in", r.index, r.axis - (r.axis > axis), r.owner))
        return related(Link("in", r.index, r.axis + (r.axis >= axis), r.owner))
    axis = _scan_axis(node, "scan_output_axes", k, view.rank(node.outputs[r.index]))
    if r.side == "body":  # scan output k, stacked along its axis into the node's output
        return related(Link("out", r.index, r.axis + (r.axis >= axis), r.owner))
    return barrier("channels reach the scan axis") if r.axis == axis else \
        related(Link("body", r.index, r.axis - (r.axis > axis), r.owner))
