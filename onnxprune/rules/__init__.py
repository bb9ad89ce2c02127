"""The rule table: all op knowledge lives here, one small function per op family.

A rule answers, for one op type, when a channel axis reaches one of the node's
inputs or outputs (a ``Reached``): which axes of its other inputs and outputs
carry the same channels, and through which index mapping (``Link``s with an
``owner`` array: position -> group channel, -1 for positions the group does
not own); which positions must be pruned together (``ties``, e.g. the groups
of a grouped convolution); or that the channels must stop here (a barrier).

A link to a constant input means "slice this constant along ``axis``"; a link
to a computed tensor extends the group. Optional hooks:

- ``source(node, view)`` -> [(output index, axis)]: channel spaces the node
  creates (a Conv's filters, a Gemm's output features). Groups start there.
- ``rewrite(node, view, cut)``: fix attributes or shape constants after the
  cut (a depthwise Conv's ``group``, a Reshape target, Split sizes).

Adding an op means adding one rule and one test.
"""

from __future__ import annotations

# Register every family (imported for their side effect: each module fills RULES).
from . import (  # noqa: F401
    contrib,
    contrib_attention,
    control,
    conv,
    elementwise,
    linear,
    norm,
    pool,
    quant,
    recurrent,
    repeat,
    reshape,
    shape,
)
from .registry import RULES, lookup

__all__ = ["RULES", "lookup"]
