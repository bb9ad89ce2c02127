"""If: its results are its branches' outputs.

Result i of an If is output i of whichever branch runs, so channels on axis a
of result i are the channels on axis a of output i of both branches: one
group, cut alike whichever branch runs (both must agree: a branch whose
output cannot be cut blocks the whole group). Channels reach the branches'
nodes along the outer tensors they read (analysis/groups.py), and the grower
visits the If from a branch output (side: the branch's attribute name). The
condition carries no channels. Loop and Scan have no rule yet: their bodies'
inputs and outputs (carried values, scan slices) are barriers.
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
