"""The training device, and mixed precision on CUDA: the forward pass under ``torch.autocast``.

bfloat16 where the GPU computes it natively (compute capability 8 and up,
and ROCm), float16 elsewhere, with a ``GradScaler`` (float16 gradients
underflow without one; bfloat16 has float32's range and needs none). The
parameters, the optimizer and the losses stay float32: autocast runs matmuls
and convolutions in the low precision and reductions, softmax and the losses
in float32. On the CPU, and for a model whose weights are not float32 (it
already computes in its own precision, and a GradScaler cannot unscale
float16 gradients), nothing changes.
"""

from __future__ import annotations

import contextlib

from ..errors import UsageError


def pick_device(torch, requested: str) -> str:
    """The device a `device` request means ("auto": CUDA when PyTorch has it, else the CPU)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("`device` cuda: no CUDA device is available to PyTorch")
    return requested


def autocast_dtype(torch, device: str):
    """The dtype training on ``device`` runs its forward pass in; None: float32, no autocast."""
    if not device.startswith("cuda"):
        return None
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


class Precision:
    """The autocast context and the backward/step of one batch, with a GradScaler for float16."""

    def __init__(self, torch, device: str, parameters):
        dtype = autocast_dtype(torch, device)
        if dtype is not None and any(p.dtype != torch.float32 for p in parameters):
            dtype = None
        self.torch, self.dtype = torch, dtype
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else "float32"

    def disable(self) -> None:
        """Train in float32 from now on (an op failed under autocast)."""
        self.dtype = self.scaler = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast("cuda", dtype=self.dtype)

    def exact(self):
        """float32 inside an autocast region (computations that need the precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast("cuda", enabled=False)

    def step(self, loss, optimizer, schedule) -> None:
        """Backward, optimizer step, schedule step (the schedule waits while the scaler skips
        steps whose float16 gradients overflowed, so the cosine runs over the real steps)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            schedule.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        scale = self.scaler.get_scale()
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # a lowered scale means this step was skipped
            schedule.step()
