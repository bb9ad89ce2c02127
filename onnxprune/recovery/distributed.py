"""Recovery training over several processes: PyTorch DistributedDataParallel under torchrun.

``torchrun --nproc-per-node N -m onnxprune MODEL ... --distill`` starts N
copies of the command; torchrun tells each its place through environment
variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), read here into a ``World``. Every rank loads, prunes
(deterministically: the same cut everywhere) and trains; only training is
split: each rank takes ``batch_size / WORLD_SIZE`` samples of every global
batch (``Shard``), DistributedDataParallel averages the gradients, and the
validation sums are all-reduced, so that every rank holds the same weights
and takes the same best-epoch and stop decisions. Rank 0 alone checks and
writes the outputs (cli/prune.py makes the other ranks dry runs).

The backend follows the device: gloo on CPU, NCCL on CUDA (each rank on the
GPU of its ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the ones torchrun started (one process: size 1, rank 0)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> World:
        env = os.environ if env is None else env
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise UsageError(f"WORLD_SIZE is {size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun, "
                             "or run in one process (without WORLD_SIZE)")
        if size > 1 and not 0 <= rank < size:
            raise UsageError(f"RANK {rank} is outside WORLD_SIZE {size}")
        return cls(max(size, 1), rank, local)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The rank that writes and prints."""
        return self.rank == 0


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@contextmanager
def process_group(world: World, options):
    """The default process group for ``world`` while the block runs, its backend chosen by the
    device ``options`` (PruneOptions) train on; nothing for one process. Yields the backend, or None."""
    if not world.distributed:
        yield None
        return
    import torch
    import torch.distributed as dist

    backend = backend_for(_training_device(options))
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)  # "cuda" then means this rank's GPU
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    try:
        yield backend
        # every rank done before any tears the group down: a rank destroying it while another still
        # talks to it can abort that one in gloo's threads ("terminate called ...", seen once in CI).
        # Only on success: after an error the other ranks may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def distributed_options(world: World, options):
    """``options`` (PruneOptions) for this rank: rank 0 unchanged, the others a quiet dry run
    that writes nothing, so that only rank 0 checks and writes the output paths."""
    if options.training is None:
        raise UsageError(f"WORLD_SIZE is {world.size} (torchrun): only recovery training runs distributed; add "
                         "--distill or --finetune, or run in one process (without WORLD_SIZE)")
    if world.main:
        return options
    silent = replace(options.output, dry_run=True, report_path=None, plan_out=None, summary_md=None)
    return replace(options, output=silent, quiet=True, training=replace(options.training, quiet=True))


def _training_device(options) -> str:
    """The device training will use ("auto" resolved), which picks the backend; "cpu" without training."""
    if options.training is None:
        return "cpu"
    from ..errors import require
    from .precision import pick_device

    return pick_device(require("torch", "recovery training", "'onnxprune[torch]'"), options.training.device)


class Shard:
    """This rank's part of the training: its samples, its batch, and the sums every rank adds up.

    Without a process group (or with one process) it is the whole data and sums stay local."""

    def __init__(self, torch, device: str, size: int = 1, rank: int = 0, backend: str | None = None):
        self.torch, self.device = torch, device
        self.size, self.rank, self.backend = size, rank, backend

    @classmethod
    def current(cls, torch, device: str) -> Shard:
        """The shard of this process in the default process group (the whole, without one)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(torch, device, dist.get_world_size(), dist.get_rank(), dist.get_backend())
        return cls(torch, device)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def batch(self, batch_size: int, fixed: int | None) -> int:
        """Each rank's batch: the global ``batch_size`` split evenly, so that the ranks' batches
        together are the one-process batch."""
        if not self.distributed:
            return batch_size
        if fixed:
            raise UsageError(f"the model fixes its batch size at {fixed}: it cannot be split over "
                             f"{self.size} processes; train in one process")
        if batch_size % self.size:
            raise UsageError(f"`batch_size` {batch_size} is the global batch: it must be a multiple of the "
                             f"{self.size} processes")
        return batch_size // self.size

    def training_order(self, order: np.ndarray) -> np.ndarray:
        """This rank's samples of the epoch's ``order`` (the same on every rank): DistributedSampler's
        interleaved share (padded by repeating the first samples so that every rank has as many
        batches), so that the k-th batches of all ranks are together the k-th one-process batch.
        Its own shuffle stays off: the order is the seeded one of the one-process run."""
        if not self.distributed:
            return order
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(len(order)), num_replicas=self.size, rank=self.rank, shuffle=False)
        return order[np.fromiter(iter(sampler), dtype=np.int64)]

    def validation_part(self, count: int) -> np.ndarray:
        """The validation samples this rank measures (every sample on exactly one rank)."""
        if self.distributed and count < self.size:
            raise UsageError(f"the validation split has {count} samples, fewer than the {self.size} processes")
        return np.arange(self.rank, count, self.size)

    def wrap(self, net):
        """``run(feeds, names)`` of ``net``'s graph through DistributedDataParallel, which averages
        the gradients over the ranks in backward; ``net.run`` itself without a group."""
        if not self.distributed:
            return net.run
        torch = self.torch
        runner = _runner(torch)(net)
        ids = [torch.cuda.current_device()] if self.device.startswith("cuda") else None
        # a learned tensor the loss does not reach (a second graph output's head) gets no gradient
        # (its buffers are the graph's constants, equal everywhere: no broadcast before each batch)
        return torch.nn.parallel.DistributedDataParallel(runner, device_ids=ids, find_unused_parameters=True,
                                                         broadcast_buffers=False)

    def total(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64), the same result on every rank."""
        if not self.distributed:
            return list(values)
        torch = self.torch
        device = self.device if self.backend == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()


def _runner(torch):
    class GraphRun(torch.nn.Module):
        """``TorchGraph.run`` as a forward pass, the call DistributedDataParallel intercepts."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, feeds, names):
            return self.net.run(feeds, names)

    return GraphRun
