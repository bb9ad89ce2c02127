"""The training losses of recovery (train.py): distillation, feature matching, fine-tuning and the
group-lasso regulariser. Each takes torch tensors and returns a scalar tensor."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..metrics import class_labels


def distill_loss(torch, kind: str, temperature: float, student, teacher):
    """``kl``: KL(softmax(t / T) || softmax(s / T)) * T^2 over the class axis, averaged over every
    other position: one distribution per sample of (batch, classes) logits, per token of
    (batch, seq, vocab) language-model logits, per pixel of (batch, classes, H, W) maps. ``mse``:
    relative to the teacher's scale, so that it reads the same for every model. ``auto``: kl for
    float outputs of rank 2 and 3 with more than one class, else mse."""
    F = torch.nn.functional
    if kind == "kl" or (kind == "auto" and _scores_last(student)):
        if student.dim() < 2:
            raise UsageError(f"`distill_loss` kl needs scores over a class axis; the output has shape "
                             f"{tuple(student.shape)}")
        t = temperature
        # rank 2 and 3 (sequence models) keep the classes last, rank 4 and up (NCHW maps) on axis 1
        axis = student.dim() - 1 if student.dim() <= 3 else 1
        classes = student.shape[axis]
        s = F.log_softmax(student / t, dim=axis).movedim(axis, -1).reshape(-1, classes)
        q = F.log_softmax(teacher / t, dim=axis).movedim(axis, -1).reshape(-1, classes)
        # batchmean over the flattened rows: the mean KL per distribution, so the loss and the best
        # learning rate do not grow with the sequence length
        return F.kl_div(s, q, reduction="batchmean", log_target=True) * t * t
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def _scores_last(output) -> bool:
    """What ``auto`` distils with KL: float (batch, classes) and (batch, seq, vocab) outputs. Rank 3
    is taken as scores over the last axis, as language models, token classifiers and speech
    recognisers give them; a rank-3 output that is features (a transformer body's hidden states)
    is better distilled with mse. One class has no distribution to match (its KL is always 0)."""
    return output.is_floating_point() and output.dim() in (2, 3) and output.shape[-1] > 1


def feature_loss(torch, student, teacher, axis: int, kept: np.ndarray):
    """MSE between the student's feature and the teacher's at the channels the student kept."""
    index = torch.as_tensor(kept, device=teacher.device)
    kept_values = teacher.index_select(axis, index)
    return torch.nn.functional.mse_loss(student, kept_values) / kept_values.pow(2).mean().clamp_min(1e-12)


def finetune_loss(torch, kind: str, logits, labels):
    """Cross-entropy for (batch, classes) logits with integer labels (or ``ce``), else MSE."""
    F = torch.nn.functional
    target = torch.as_tensor(labels, device=logits.device)
    if kind == "ce" or (kind == "auto" and logits.dim() == 2 and class_labels(labels)):
        return F.cross_entropy(logits, target.long())
    return F.mse_loss(logits, target.to(logits.dtype).reshape(logits.shape))


def group_lasso(torch, net, groups):
    """Sum over the groups' channels of the L2 norm of all their weights (L1 over all weights
    without groups): drives whole channels towards zero."""
    if not groups:
        return sum(p.abs().sum() for p in net.parameters() if p.requires_grad and p.dim() > 1)
    total = 0.0
    for group in groups:
        per_channel = None
        for slot in group.params.values():
            if slot.role != "weight":
                continue
            try:
                param = net.parameter(slot.tensor.name)
            except KeyError:
                continue
            rows = param.movedim(slot.axis, 0).reshape(param.shape[slot.axis], -1).pow(2).sum(1)
            owned = torch.as_tensor(np.nonzero(slot.owner >= 0)[0], device=param.device)
            target = torch.as_tensor(slot.owner[slot.owner >= 0], device=param.device)
            sums = torch.zeros(group.size, device=param.device, dtype=rows.dtype)
            sums = sums.index_add(0, target, rows.index_select(0, owned))
            per_channel = sums if per_channel is None else per_channel + sums
        if per_channel is not None:
            total = total + per_channel.clamp_min(1e-12).sqrt().sum()
    return total
