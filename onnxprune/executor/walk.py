"""A graph run one node at a time over many batches at once.

    walk = Walk(graph, batches, wanted=["conv3_out"])
    inputs = walk.before("conv3")          # every batch's values, up to the node's inputs
    ... change graph parameters ...         # the rest of the walk computes with them
    outputs = walk.take("conv3_out")       # runs on until the tensor exists

Layer-wise reconstruction needs statistics over all calibration samples at
one point of the graph before the next node may run (its weights change
with them), so every batch advances together: one environment per batch,
each node run for all of them before the next. Values are dropped after
their last use, as in a forward pass, so memory is the live set of the
graph times the number of batches. ``wanted`` tensors are kept from the
moment they are computed until ``take`` hands them over (a walk over another
graph may ask for them in another order).
"""

from __future__ import annotations

from collections.abc import Iterable

from .module import TorchGraph


class Walk:
    def __init__(self, graph: TorchGraph, batches: list[list], wanted: Iterable[str] = ()):
        """``batches``: the graph inputs of each batch, in ``graph.input_names`` order."""
        self.graph = graph
        self.plan = graph._plan(tuple(graph.output_names))
        self.schedule = self.plan.schedule
        self.envs = [graph._env(inputs) for inputs in batches]
        self.device = graph._anchor.device
        self.position = 0
        self.slot = graph._read_slot
        self.wanted = {self.slot[n]: n for n in wanted if n in self.slot}
        self.stash: dict[str, list] = {}

    def _producer(self, name: str) -> int:
        """Index in the schedule of the step that computes ``name``."""
        slot = self.slot[name]
        return next(i for i, entry in enumerate(self.schedule) if slot in entry[3])

    def _advance(self, stop: int) -> None:
        """Run the steps before ``stop`` (an index into the schedule) for every batch."""
        for entry in self.schedule[self.position:stop]:
            outs = entry[3]
            for env in self.envs:
                self.graph._loop((entry,), env, self.device)
            for s in outs:
                if s in self.wanted:
                    self.stash[self.wanted[s]] = [env[s] for env in self.envs]
        self.position = max(self.position, stop)

    def before(self, node_output: str) -> list[list]:
        """Run up to the step computing ``node_output``; that step's inputs, per batch."""
        index = self._producer(node_output)
        self._advance(index)
        ins = self.schedule[index][2]
        return [[env[s] for s in ins] for env in self.envs]

    def take(self, name: str) -> list:
        """Every batch's value of ``name`` (a wanted tensor), running on until it exists."""
        if name not in self.stash:
            self._advance(self._producer(name) + 1)
        return self.stash.pop(name)
