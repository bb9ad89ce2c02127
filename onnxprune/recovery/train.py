"""Recovery: fine-tuning and knowledge distillation of a pruned ONNX model, in PyTorch.

The pruned graph runs as a ``TorchGraph`` (executor.py): its initializers are
the parameters, training updates them, and ``write_back`` stores them in the
same initializers, so the written model has the pruned graph unchanged.

Losses (summed when both are asked for):

- distillation (``distill``): the original model is the teacher, no labels
  needed. ``kl``: KL(softmax(t / T) || softmax(s / T)) * T^2 on outputs shaped
  (batch, classes); ``mse`` otherwise (``auto`` picks). Optionally plus the
  MSE between intermediate features of student and teacher at the channels
  the student kept (``feature_weight``), normalised by the teacher's scale.
- fine-tuning (``finetune``): cross-entropy against integer labels for
  (batch, classes) outputs, else (or with ``loss="mse"``) MSE against labels.
- sparsity (``sparsity_reg`` = lambda): group lasso over the channel groups
  given (sum over channels of the L2 norm of all their weights), which drives
  whole channels towards zero before pruning; L1 over all weights when no
  groups are given.

A seeded ``val_fraction`` of the data is held out. After every epoch the
validation loss, the top-1 accuracy (with labels) and the output error
against the teacher are measured; the best epoch's weights are kept (with
--finetune the highest validation accuracy; distillation alone uses no labels
and keeps the lowest validation loss).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ..cut import iochange
from ..data import Dataset
from ..errors import UsageError, require
from ..metrics import ErrorSum, class_labels
from ..metrics import logits as metrics_logits
from ..model.inputs import fixed_batch
from ..options import TrainOptions
from ..progress import progress


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None
    val_output_error: float


@dataclass
class TrainingReport:
    mode: str
    device: str
    epochs: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    train_samples: int = 0
    val_samples: int = 0
    seconds: float = 0.0
    samples_per_second: float = 0.0
    before: dict = field(default_factory=dict)  # validation metrics of the pruned model before training

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FeaturePoint:
    """Teacher tensor ``name`` matched on the student's tensor of the same name at ``kept`` of ``axis``."""

    name: str
    axis: int
    kept: np.ndarray


def pick_device(torch, requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("`device` cuda: no CUDA device is available to PyTorch")
    return requested


def classes_axis_ok(output_shape) -> bool:
    return len(output_shape) == 2


def train(student: onnx.ModelProto, teacher: onnx.ModelProto, data: Dataset, options: TrainOptions,
          groups=None, features: list[FeaturePoint] = ()) -> tuple[onnx.ModelProto, TrainingReport]:
    """Train ``student`` (the pruned model) and return it with the best epoch's weights written back."""
    torch = require("torch", "recovery training", "'onnxprune[torch]'")
    from ..executor.module import TorchGraph

    options.check()
    fixed = fixed_batch(teacher)
    if fixed:  # the graph fixes it (a Reshape target may bake it in): train at that size
        options = replace(options, batch_size=fixed)
    if options.finetune and data.labels is None:
        raise UsageError("`finetune` needs labels: add a 'labels' array to the `data` file")
    torch.manual_seed(options.seed)
    device = pick_device(torch, options.device)
    train_data, val_data = data.split(options.val_fraction, options.seed)
    if fixed and min(len(train_data), len(val_data)) < fixed:
        raise UsageError(f"the model's batch size is fixed at {fixed}: training needs at least {fixed} samples in "
                         f"the training and in the validation split (have {len(train_data)} and {len(val_data)}; "
                         "see `val_fraction`)")
    net = TorchGraph(student).to(device)
    teacher_net = TorchGraph(teacher, trainable=lambda name: False).to(device) if options.distill else None
    if teacher_net is not None:
        teacher_net.eval()
    context = _Context(torch, net, teacher_net, options, features, groups, device, iochange.read(student),
                       whole=fixed is not None)
    train_data, val_data = context.with_teacher_outputs(train_data), context.with_teacher_outputs(val_data)
    report = TrainingReport(_mode(options), device, train_samples=len(train_data), val_samples=len(val_data))
    report.before = asdict(context.validate(val_data, 0, math.nan))
    # The untrained weights compete too (training may only make things worse), except under
    # --sparsity-reg, whose purpose is to change them.
    best_state = copy.deepcopy(net.state_dict())
    best_key = (-math.inf,) if options.sparsity_reg else _rank(report.before, options)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=options.lr)
    # cosine decay over all steps: large early steps recover quickly, small late ones settle
    steps = options.epochs * math.ceil(len(train_data) / options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    started, seen = time.perf_counter(), 0
    for epoch in range(1, options.epochs + 1):
        train_loss, count = context.epoch(train_data, optimizer, epoch, schedule)
        seen += count
        log = context.validate(val_data, epoch, train_loss)
        report.epochs.append(log)
        if _rank(asdict(log), options) > best_key:
            best_state, best_key = copy.deepcopy(net.state_dict()), _rank(asdict(log), options)
            report.best_epoch = epoch
    report.seconds = time.perf_counter() - started
    report.samples_per_second = seen / report.seconds if report.seconds > 0 else 0.0
    net.load_state_dict(best_state)
    return net.cpu().write_back(student), report


def _mode(options: TrainOptions) -> str:
    return "+".join(m for m, on in (("distill", options.distill), ("finetune", options.finetune)) if on)


def _rank(metrics: dict, options: TrainOptions) -> tuple:
    """Higher is better: with --finetune, accuracy first, then the lower validation loss.

    Distillation alone uses no labels, not even to pick the epoch: the
    validation loss decides. With --sparsity-reg the objective itself (the
    validation loss, which includes the regulariser) decides: accuracy alone
    would undo the shrinking.
    """
    accuracy = metrics.get("val_accuracy")
    loss = metrics.get("val_loss")
    by_loss = -loss if loss is not None and math.isfinite(loss) else -math.inf
    if options.sparsity_reg or not options.finetune:
        return (by_loss,)
    return (accuracy if accuracy is not None else 0.0, by_loss)


# The teacher's outputs ride along with their samples in the Dataset under this prefix (no input
# name starts with it); up to this many bytes of them are kept instead of rerunning the teacher.
TEACHER_KEY = "\0teacher:"
TEACHER_CACHE_BYTES = 1 << 29


class _Context:
    def __init__(self, torch, net, teacher, options: TrainOptions, features, groups, device, changes=(),
                 whole: bool = False):
        self.torch, self.net, self.teacher, self.options = torch, net, teacher, options
        self.features, self.groups, self.device = list(features), groups, device
        self.output = net.output_names[0]
        self.whole = whole  # the model fixes its batch size: no short last batch
        self.changes = list(changes)  # graph inputs/outputs the student has reshaped (--allow-io-change)
        self.output_kept = [(c.axis, c.kept) for c in self.changes if c.role == "output" and c.name == self.output]

    # --- the teacher's outputs, computed once -----------------------------------------
    def teacher_names(self) -> list[str]:
        return [self.output] + [f.name for f in self.features]

    def with_teacher_outputs(self, data: Dataset) -> Dataset:
        """``data`` carrying the teacher's outputs per sample (``TEACHER_KEY`` + name), so that
        the teacher runs once instead of every epoch; ``data`` itself when they would take more
        than ``TEACHER_CACHE_BYTES`` (large feature maps) or cannot be split per sample."""
        if self.teacher is None or (self.whole and len(data) % self.options.batch_size):
            return data
        torch, names, parts = self.torch, self.teacher_names(), []
        with torch.no_grad():
            for feeds, _ in data.batches(self.options.batch_size, self.whole):
                n = len(next(iter(feeds.values())))
                values = self.teacher.run(self.to_device(feeds), names)
                if any(v.dim() == 0 or v.shape[0] != n for v in values.values()):
                    return data  # an output without a per-sample batch axis
                if not parts and sum(v.numel() * v.element_size() for v in values.values()) / n * len(data) \
                        > TEACHER_CACHE_BYTES:
                    return data
                parts.append({k: v.cpu().numpy() for k, v in values.items()})
        cached = {TEACHER_KEY + k: np.concatenate([p[k] for p in parts]) for k in names}
        return Dataset({**data.inputs, **cached}, data.labels, data.source, data.notes)

    # --- losses -------------------------------------------------------------------
    def losses(self, feeds: dict, labels):
        """``feeds``: numpy arrays for the teacher (the original model), with its outputs when cached."""
        torch, o = self.torch, self.options
        names = self.teacher_names()
        cached = {k[len(TEACHER_KEY):]: v for k, v in feeds.items() if k.startswith(TEACHER_KEY)}
        feeds = {k: v for k, v in feeds.items() if not k.startswith(TEACHER_KEY)}
        values = self.net.run(self.to_device(iochange.candidate_feeds(feeds, self.changes)), names)
        logits = values[self.output]
        total = logits.new_zeros(())
        teacher = None
        if self.teacher is not None:
            if cached:
                teacher = self.to_device(cached)
            else:
                with torch.no_grad():
                    teacher = self.teacher.run(self.to_device(feeds), names)
            for axis, kept in self.output_kept:  # compare the positions the student still produces
                index = torch.as_tensor(kept, device=teacher[self.output].device)
                teacher[self.output] = teacher[self.output].index_select(axis, index)
            total = total + self.distill_loss(logits, teacher[self.output])
            for f in self.features:
                total = total + o.feature_weight * self.feature_loss(values[f.name], teacher[f.name], f)
        if o.finetune:
            total = total + self.finetune_loss(logits, labels)
        if o.sparsity_reg:
            total = total + o.sparsity_reg * self.sparsity()
        return total, logits, teacher[self.output] if teacher is not None else None

    def distill_loss(self, student, teacher):
        F = self.torch.nn.functional
        kind = self.options.distill_loss
        if kind == "kl" or (kind == "auto" and student.dim() == 2):
            t = self.options.temperature
            return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                            reduction="batchmean", log_target=True) * t * t
        return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)

    def feature_loss(self, student, teacher, point: FeaturePoint):
        index = self.torch.as_tensor(point.kept, device=teacher.device)
        kept = teacher.index_select(point.axis, index)
        return self.torch.nn.functional.mse_loss(student, kept) / kept.pow(2).mean().clamp_min(1e-12)

    def finetune_loss(self, logits, labels):
        F = self.torch.nn.functional
        target = self.torch.as_tensor(labels, device=logits.device)
        if self.options.loss == "ce" or (self.options.loss == "auto" and logits.dim() == 2 and class_labels(labels)):
            return F.cross_entropy(logits, target.long())
        return F.mse_loss(logits, target.to(logits.dtype).reshape(logits.shape))

    def sparsity(self):
        """Group lasso over the groups' channels (L1 over all weights without groups)."""
        torch = self.torch
        if not self.groups:
            return sum(p.abs().sum() for p in self.net.parameters() if p.requires_grad and p.dim() > 1)
        total = 0.0
        for group in self.groups:
            per_channel = None
            for slot in group.params.values():
                if slot.role != "weight":
                    continue
                try:
                    param = self.net.parameter(slot.tensor.name)
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

    # --- loops ----------------------------------------------------------------------
    def to_device(self, feeds: dict) -> dict:
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}

    def epoch(self, data: Dataset, optimizer, epoch: int, schedule) -> tuple[float, int]:
        order = np.random.default_rng([self.options.seed, epoch]).permutation(len(data))
        shuffled = data.subset(order)
        steps = math.ceil(len(data) / self.options.batch_size)
        batches = progress(shuffled.batches(self.options.batch_size, self.whole), steps,
                           f"epoch {epoch}/{self.options.epochs}", self.options.quiet)
        total, count = 0.0, 0
        self.net.train()
        for feeds, labels in batches:
            loss, _, _ = self.losses(feeds, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            n = len(next(iter(feeds.values())))
            total += float(loss.detach()) * n
            count += n
            if hasattr(batches, "set_postfix"):  # a tqdm bar (on a terminal)
                batches.set_postfix(loss=f"{total / count:.4g}")
        return total / max(count, 1), count

    def validate(self, data: Dataset, epoch: int, train_loss: float) -> EpochLog:
        torch = self.torch
        self.net.eval()
        loss_sum, correct, count, error, compared = 0.0, 0, 0, ErrorSum(), False
        classes = class_labels(data.labels)
        with torch.no_grad():
            for feeds, labels in data.batches(self.options.batch_size, self.whole):
                loss, logits, teacher = self.losses(feeds, labels)
                n = len(logits)
                loss_sum += float(loss) * n
                count += n
                classes = classes and metrics_logits(logits, n)
                if classes:
                    correct += int((logits.argmax(1).cpu().numpy() == labels).sum())
                if teacher is not None:
                    error.add(teacher.double().cpu().numpy(), logits.double().cpu().numpy())
                    compared = True
        accuracy = correct / count if classes and count else None
        return EpochLog(epoch, train_loss, loss_sum / max(count, 1), accuracy, error.value if compared else math.nan)


# --- the Python API -------------------------------------------------------------------

def distill(student: onnx.ModelProto, teacher: onnx.ModelProto, data: Dataset,
            **options) -> tuple[onnx.ModelProto, TrainingReport]:
    """Knowledge distillation of ``student`` from ``teacher`` (no labels needed); options as TrainOptions."""
    finetune = options.pop("finetune", False)
    return train(student, teacher, data, TrainOptions(distill=True, finetune=finetune, **options))


def finetune(model: onnx.ModelProto, data: Dataset, **options) -> tuple[onnx.ModelProto, TrainingReport]:
    """Fine-tuning of ``model`` on the labels in ``data``; options as TrainOptions."""
    return train(model, model, data, TrainOptions(distill=False, finetune=True, **options))
