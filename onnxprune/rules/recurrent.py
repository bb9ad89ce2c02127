"""LSTM, GRU and RNN: the hidden size, gate by gate, and the input size.

D is the number of directions, H the hidden units, I the input features and G
the gates (LSTM 4, in the order i, o, f, c; GRU 3: z, r, h; RNN 1). X is
(T, B, I), or (B, T, I) with layout 1; W is (D, G*H, I), R (D, G*H, H), B
(D, 2*G*H) (Wb then Rb) and LSTM's peepholes P (D, 3H); Y is (T, D, B, H) or
(B, T, D, H), and the states (Y_h, Y_c, initial_h, initial_c) are (D, B, H) or
(B, D, H).

Every layout puts the hidden units on axis 3 of Y and axis 2 of the states, and
the input features on axis 2 of X, so one mapping serves both layouts.

The hidden units are a channel space the node creates (its ``source``). Unit j
is row j of every gate block of W, R and B (and of P), so its owner on a gate
axis is the hidden owner repeated once per block: the same units are kept in
every gate, and the weights keep their gate layout. Both directions of a
bidirectional layer keep the same units (their owners are the same array), so
Y's direction axis, which exporters fold into the features with a Transpose and
a Reshape, repeats the group's channels and the next layer's weights are cut
alike in both halves. R is the recurrence: its columns (axis 2) are the hidden
units read back, cut with its rows. Input features reach W's axis 2.
"""

from __future__ import annotations

import numpy as np

from .registry import Link, Reached, barrier, related, rule

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
PEEPHOLES = 3  # LSTM's P holds the i, o and f peepholes

# Where the hidden units are: (side, index, axis) of every slot that carries them.
_HIDDEN_OUTPUTS = {"LSTM": (0, 1, 2), "GRU": (0, 1), "RNN": (0, 1)}  # Y, Y_h[, Y_c]
_HIDDEN_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h[, initial_c]


def _hidden_axis(side: str, index: int) -> int:
    return 3 if side == "out" and index == 0 else 2  # Y (.., D, B/T, H) vs the states (.., H)


def _present(tensors, index: int) -> bool:
    return index < len(tensors) and tensors[index] is not None and tensors[index].name != ""


def _weights_known(node, view) -> bool:
    return all(_present(node.inputs, i) and view.is_constant(node.inputs[i]) for i in (1, 2))


def hidden_source(node, view):
    """The hidden units, on the first output the node has (Y, else Y_h, else Y_c)."""
    if not _weights_known(node, view):
        return []
    index = next((i for i in _HIDDEN_OUTPUTS[node.op] if _present(node.outputs, i)), None)
    return [] if index is None else [(index, _hidden_axis("out", index))]


def _is_hidden(node, r: Reached) -> bool:
    places = _HIDDEN_OUTPUTS[node.op] if r.side == "out" else _HIDDEN_STATES[node.op]
    return r.index in places and r.axis == _hidden_axis(r.side, r.index)


def _hidden_links(node, owner: np.ndarray) -> list[Link]:
    gates = GATES[node.op]
    gated = np.tile(owner, gates)
    links = [Link("out", i, _hidden_axis("out", i), owner) for i in _HIDDEN_OUTPUTS[node.op]]
    links += [Link("in", i, 2, owner, "state") for i in _HIDDEN_STATES[node.op]]
    links += [
        Link("in", 1, 1, gated, "weight"),  # W's rows, gate by gate
        Link("in", 2, 1, gated, "weight"),  # R's rows
        Link("in", 2, 2, owner, "weight"),  # R's columns: the units read back
        Link("in", 3, 1, np.tile(owner, 2 * gates), "bias"),  # Wb then Rb
    ]
    if node.op == "LSTM":
        links.append(Link("in", 7, 1, np.tile(owner, PEEPHOLES), "norm"))
    return links


def _rewrite_hidden_size(node, view, cut) -> None:
    """``hidden_size`` follows R's columns (the units kept)."""
    recurrence = node.inputs[2]
    removed = cut.params.get((id(node), 2), {}).get(2, ())
    node.attrs["hidden_size"] = int(recurrence.shape[2]) - len(removed)


@rule("LSTM", "GRU", "RNN", source=hidden_source, rewrite=_rewrite_hidden_size)
def recurrent(node, view, r: Reached):
    if not _weights_known(node, view):
        return barrier("weights are computed at run time")
    if _is_hidden(node, r):
        return related(*_hidden_links(node, r.owner))
    if r.side == "in" and r.index == 0 and r.axis == 2:
        return related(Link("in", 1, 2, r.owner, "weight"))  # W's columns: the input features
    where = "output" if r.side == "out" else "input"
    return barrier(f"channels reach axis {r.axis} of {where} {r.index}")
