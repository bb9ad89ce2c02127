"""Recurrent layers (rules/recurrent.py): LSTM, GRU and RNN, as the ONNX operator documents define
them: gate order i, o, f, c (LSTM) and z, r, h (GRU), biases Wb then Rb, LSTM's peepholes i, o,
f and ``input_forget`` (f = 1 - i, as onnxruntime couples them), the ``activations`` with their
``activation_alpha``/``activation_beta``, ``clip`` on every activation's input, both directions,
``layout`` 0 and 1, and ``sequence_lens``.

Each direction runs step by step over time (the input projection of all steps is one matmul);
a batch entry past its length keeps its state and outputs zeros, and the reverse direction reads
each sequence backwards from its own last step, as onnxruntime does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedModel
from .registry import Tensor, op, opt

# Activation name (lower case) -> (function of x, alpha, beta; default alpha, default beta;
# how many of alpha/beta it reads from the attribute lists).
_ACTIVATIONS = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "softsign": (lambda x, a, b: F.softsign(x), None, None),
    "softplus": (lambda x, a, b: F.softplus(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
}
_DEFAULTS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _activations(op_type: str, attrs: dict, directions: int) -> list:
    """Per direction, the op's activation functions (each of x alone), alpha and beta taken in
    order from the attribute lists by the activations that have them."""
    names = [n.decode() if isinstance(n, bytes) else n for n in attrs.get("activations", _DEFAULTS[op_type])]
    per = len(_DEFAULTS[op_type])
    if len(names) == per and directions == 2:
        names = names * 2
    if len(names) != per * directions:
        raise UnsupportedModel(f"{op_type}: {len(names)} activations for {directions} direction(s)")
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    fns = []
    for name in names:
        found = _ACTIVATIONS.get(name.lower())
        if found is None:
            raise UnsupportedModel(f"{op_type}: activation {name} is not implemented")
        fn, alpha, beta = found
        a = alphas.pop(0) if alpha is not None and alphas else alpha
        b = betas.pop(0) if beta is not None and betas else beta
        fns.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def _prepare(op_type: str):
    def prepare(attrs: dict) -> dict:
        direction = attrs.get("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "reverse", "bidirectional"):
            raise UnsupportedModel(f"{op_type}: direction {direction!r}")
        attrs["_directions"] = ["forward", "reverse"] if direction == "bidirectional" else [direction]
        attrs["_fns"] = _activations(op_type, attrs, len(attrs["_directions"]))
        return attrs
    return prepare


def _clip(x: Tensor, attrs: dict) -> Tensor:
    limit = attrs.get("clip")
    return x if limit is None else torch.clamp(x, -limit, limit)


def _reversal(lengths: Tensor | None, steps: int, batch: int, device) -> Tensor:
    """Time index (T, B) reading each sequence backwards within its length (its own inverse)."""
    t = torch.arange(steps, device=device).unsqueeze(1).expand(steps, batch)
    if lengths is None:
        return steps - 1 - t
    lengths = lengths.to(device=device, dtype=torch.long).unsqueeze(0)
    return torch.where(t < lengths, lengths - 1 - t, t)


def _along_time(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 0, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _run(cell, x: Tensor, states: tuple, lengths: Tensor | None, reverse: bool):
    """Run ``cell(projected x_t, states) -> states`` over time; (Y (T, B, H), final states)."""
    steps, batch = x.shape[0], x.shape[1]
    index = _reversal(lengths, steps, batch, x.device) if reverse else None
    if index is not None:
        x = _along_time(x, index)
    active = None if lengths is None else (
        torch.arange(steps, device=x.device).unsqueeze(1) < lengths.to(x.device).long().unsqueeze(0))
    outputs = []
    for t in range(steps):
        new = cell(x[t], states)
        if active is not None:
            keep = active[t].unsqueeze(1)
            new = tuple(torch.where(keep, n, s) for n, s in zip(new, states))
            outputs.append(torch.where(keep, new[0], torch.zeros_like(new[0])))
        else:
            outputs.append(new[0])
        states = new
    y = torch.stack(outputs)
    if index is not None:
        y = _along_time(y, index)
    return y, states


def _recurrent(op_type: str, attrs: dict, inputs: list, make_cell):
    """The part all three share: layout, directions, projections, states and outputs."""
    x, w, r = inputs[0], inputs[1], inputs[2]
    bias, lengths = opt(inputs, 3), opt(inputs, 4)
    layout = attrs.get("layout", 0)
    if layout:
        x = x.transpose(0, 1)
    batch, hidden = x.shape[1], r.shape[-1]
    gates = _GATES[op_type]
    initial = [opt(inputs, i) for i in ((5, 6) if op_type == "LSTM" else (5,))]
    initial = [None if s is None else (s.transpose(0, 1) if layout else s) for s in initial]
    ys, finals = [], []
    for d, direction in enumerate(attrs["_directions"]):
        wb = rb = None
        if bias is not None:
            wb, rb = bias[d, :gates * hidden], bias[d, gates * hidden:]
        projected = torch.matmul(x, w[d].t()) if wb is None else torch.matmul(x, w[d].t()) + wb
        states = tuple(x.new_zeros(batch, hidden) if s is None else s[d] for s in initial)
        cell = make_cell(r[d], rb, attrs["_fns"][d], d)
        y, states = _run(cell, projected, states, lengths, direction == "reverse")
        ys.append(y)
        finals.append(states)
    y = torch.stack(ys, 1)  # (T, D, B, H)
    outs = [y] + [torch.stack([f[k] for f in finals]) for k in range(len(finals[0]))]  # Y_h[, Y_c] (D, B, H)
    if layout:
        outs = [outs[0].permute(2, 0, 1, 3)] + [s.transpose(0, 1) for s in outs[1:]]
    return tuple(outs[: attrs["_num_outputs"]]) if attrs["_num_outputs"] > 1 else outs[0]


@op("LSTM", prepare=_prepare("LSTM"))
def lstm(attrs, inputs):
    peepholes = opt(inputs, 7)
    coupled = bool(attrs.get("input_forget", 0))

    def make_cell(r, rb, fns, d):
        f, g, h = fns
        p_i, p_o, p_f = (None, None, None) if peepholes is None else peepholes[d].chunk(3)

        def cell(xw, states):
            h_prev, c_prev = states
            z = xw + h_prev @ r.t() if rb is None else xw + h_prev @ r.t() + rb
            zi, zo, zf, zc = z.chunk(4, -1)
            if p_i is not None:
                zi, zf = zi + p_i * c_prev, zf + p_f * c_prev
            inp = f(_clip(zi, attrs))
            forget = 1 - inp if coupled else f(_clip(zf, attrs))  # input_forget: f = 1 - i (onnxruntime)
            c = forget * c_prev + inp * g(_clip(zc, attrs))
            if p_o is not None:
                zo = zo + p_o * c
            return f(_clip(zo, attrs)) * h(c), c
        return cell

    return _recurrent("LSTM", attrs, inputs, make_cell)


@op("GRU", prepare=_prepare("GRU"))
def gru(attrs, inputs):
    linear_before_reset = bool(attrs.get("linear_before_reset", 0))

    def make_cell(r, rb, fns, d):
        f, g = fns
        r_zr, r_h = r[: 2 * r.shape[1]], r[2 * r.shape[1]:]
        rb_zr, rb_h = (None, None) if rb is None else (rb[: 2 * r.shape[1]], rb[2 * r.shape[1]:])

        def cell(xw, states):
            (h_prev,) = states
            x_zr, x_h = xw[:, : 2 * r.shape[1]], xw[:, 2 * r.shape[1]:]
            zr = x_zr + h_prev @ r_zr.t() if rb_zr is None else x_zr + h_prev @ r_zr.t() + rb_zr
            z, reset = f(_clip(zr, attrs)).chunk(2, -1)
            if linear_before_reset:
                recur = h_prev @ r_h.t() if rb_h is None else h_prev @ r_h.t() + rb_h
                candidate = x_h + reset * recur
            else:
                candidate = x_h + (reset * h_prev) @ r_h.t()
                candidate = candidate if rb_h is None else candidate + rb_h
            new = g(_clip(candidate, attrs))
            return ((1 - z) * new + z * h_prev,)
        return cell

    return _recurrent("GRU", attrs, inputs, make_cell)


@op("RNN", prepare=_prepare("RNN"))
def rnn(attrs, inputs):
    def make_cell(r, rb, fns, d):
        (f,) = fns

        def cell(xw, states):
            (h_prev,) = states
            z = xw + h_prev @ r.t() if rb is None else xw + h_prev @ r.t() + rb
            return (f(_clip(z, attrs)),)
        return cell

    return _recurrent("RNN", attrs, inputs, make_cell)
