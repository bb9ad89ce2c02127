"""Recovery: fine-tuning and knowledge distillation of a pruned ONNX model, in PyTorch.

The pruned graph runs as a ``TorchGraph`` (executor/): its learned tensors
(executor/compile.py ``learned_tensors``: the tensors in a learned slot of
rules/weights.py, such as Conv/Gemm/MatMul weights and biases, norm scales,
embedding tables) are the parameters, training updates them, and
``write_back`` stores them in the same initializers, so the written model has
the pruned graph unchanged. Every other float initializer (Pow's exponent, an
epsilon, an attention scale) is a constant.

Losses (losses.py; summed when both are asked for):

- distillation (``distill``): the original model is the teacher, no labels
  needed. ``kl``: KL(softmax(t / T) || softmax(s / T)) * T^2 on outputs shaped
  (batch, classes); ``mse`` otherwise (``auto`` picks). Optionally plus the
  MSE between intermediate features of student and teacher at the channels
  the student kept (the cut groups' read points and the block outputs,
  pipeline/rounds.py), each normalised by the teacher's scale, their mean
  weighted by ``feature_weight``.
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

A non-finite loss ends training at once (before its step reaches the
weights): the best finite state so far is kept (the untrained model's, at
worst) with a warning; when the untrained model's validation loss is already
non-finite there is nothing to keep and ``VerificationFailed`` is raised.
Images read from a folder are augmented (augment.py); on CUDA the forward
pass runs under autocast (precision.py).

Within a process group of several ranks (torchrun, distributed.py) the
student runs through DistributedDataParallel: each rank trains on its share
of every global batch of ``batch_size`` and the validation sums are added up
over the ranks, so all of them keep the same epoch and stop together.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ..cut import iochange
from ..data import Dataset
from ..errors import UsageError, VerificationFailed, first_line, require
from ..metrics import ErrorSum, class_labels
from ..metrics import logits as metrics_logits
from ..model.inputs import fixed_batch
from ..options import TrainOptions
from ..progress import counter
from . import losses
from .augment import augment, image_input
from .distributed import Shard
from .precision import Precision, pick_device


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
    stopped: str = ""  # why training ended early (a non-finite loss); empty when every epoch ran
    augment: bool = False  # training batches were augmented (random resized crops and flips)
    precision: str = "float32"  # the forward pass's dtype under autocast (CUDA), else float32
    world_size: int = 1  # processes that trained together (torchrun), each on batch_size / world_size
    backend: str | None = None  # their torch.distributed backend (gloo, nccl); None in one process

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FeaturePoint:
    """Teacher tensor ``name`` matched on the student's tensor of the same name at ``kept`` of ``axis``."""

    name: str
    axis: int
    kept: np.ndarray


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
    net = TorchGraph(student, trainable="learned").to(device)  # only the learned tensors are parameters
    teacher_net = TorchGraph(teacher, trainable=lambda name: False).to(device) if options.distill else None
    if teacher_net is not None:
        teacher_net.eval()
    changes = iochange.read(student)
    images = image_input(data, net.input_names, options.augment)
    if images and any(c.role == "input" and c.name == images[0] for c in changes):
        raise UsageError(f"`augment`: input {images[0]!r} is reshaped by `allow_io_change`; it cannot be augmented")
    trained = [p for p in net.parameters() if p.requires_grad]
    if not trained:
        raise UsageError("recovery: the pruned model has no weights to train (no tensor in a learned slot of "
                         "the weight table, onnxprune/rules/weights.py)")
    shard = Shard.current(torch, device)
    context = _Context(torch, net, teacher_net, options, features, groups, device, changes,
                       whole=fixed is not None, images=images, precision=Precision(torch, device, trained),
                       shard=shard)
    report = TrainingReport(_mode(options), device, train_samples=len(train_data), val_samples=len(val_data),
                            augment=images is not None, world_size=shard.size, backend=shard.backend)
    if not images:  # augmented batches differ every epoch: their teacher outputs cannot be cached
        train_data = context.with_teacher_outputs(train_data)
    val_data = context.with_teacher_outputs(val_data.subset(shard.validation_part(len(val_data))))
    report.before = asdict(_first_validation(context, val_data))
    report.precision = context.precision.name
    if not math.isfinite(report.before["val_loss"]):
        raise VerificationFailed(_nothing_to_keep(report.before["val_loss"], data))
    # The untrained weights compete too (training may only make things worse), except under
    # --sparsity-reg, whose purpose is to change them.
    best_state = copy.deepcopy(net.state_dict())
    best_key = (-math.inf,) if options.sparsity_reg else _rank(report.before, options)
    optimizer = torch.optim.Adam(trained, lr=options.lr)
    # cosine decay over all steps: large early steps recover quickly, small late ones settle
    steps = options.epochs * math.ceil(len(shard.training_order(np.arange(len(train_data)))) / context.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    started, seen = time.perf_counter(), 0
    per_epoch = len(train_data) - len(train_data) % options.batch_size if fixed else len(train_data)
    with counter(options.epochs * per_epoch, "train", options.quiet, unit=" samples") as bar:
        for epoch in range(1, options.epochs + 1):
            bar.set_description(f"epoch {epoch}/{options.epochs}")
            train_loss, count = context.epoch(train_data, optimizer, epoch, schedule, bar)
            seen += count
            if not math.isfinite(train_loss):
                report.stopped = f"the training loss became {train_loss} at epoch {epoch}"
                break
            log = context.validate(val_data, epoch, train_loss)
            report.epochs.append(log)
            if not math.isfinite(log.val_loss):
                report.stopped = f"the validation loss became {log.val_loss} after epoch {epoch}"
                break
            if _rank(asdict(log), options) > best_key:
                best_state, best_key = copy.deepcopy(net.state_dict()), _rank(asdict(log), options)
                report.best_epoch = epoch
    report.seconds = time.perf_counter() - started
    report.samples_per_second = seen / report.seconds if report.seconds > 0 else 0.0
    if report.stopped:
        warnings.warn(_kept_message(report, options), stacklevel=2)
    net.load_state_dict(best_state)
    return net.cpu().write_back(student), report


def _first_validation(context: _Context, data: Dataset) -> EpochLog:
    """The untrained model's validation: the first forward pass under autocast, where an op that
    cannot mix float32 constants with the low-precision activations would fail. Then training
    runs in float32 instead, with a warning naming the node."""
    try:
        return context.validate(data, 0, math.nan)
    except (RuntimeError, TypeError) as exc:
        if context.precision.dtype is None:
            raise
        node = next((n for n in getattr(exc, "__notes__", ()) if n.startswith("while running")), "")
        warnings.warn(f"autocast to {context.precision.name} failed ({first_line(exc)}{'; ' if node else ''}{node}): "
                      "training in float32", stacklevel=3)
        context.precision.disable()
        return context.validate(data, 0, math.nan)


def _kept_message(report: TrainingReport, options: TrainOptions) -> str:
    best = report.best_epoch
    kept = report.epochs[best - 1].val_loss if best else report.before["val_loss"]
    which = f"epoch {best}" if best else "the untrained model (epoch 0)"
    return (f"training stopped: {report.stopped}; kept the weights of {which}, validation loss {kept:.4g}; "
            f"try a lower `lr` (was {options.lr:g})")


def _nothing_to_keep(value: float, data: Dataset) -> str:
    bad = next((k for k, v in data.inputs.items() if v.dtype.kind == "f" and not np.isfinite(v).all()), None)
    cause = (f"`data` input {bad!r} holds non-finite values" if bad
             else "the model's outputs or the loss are not finite on `data`")
    return f"recovery: the pruned model's validation loss is {value} before training ({cause}); nothing written"


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
                 whole: bool = False, images: tuple[str, str] | None = None, precision: Precision | None = None,
                 shard: Shard | None = None):
        self.torch, self.net, self.teacher, self.options = torch, net, teacher, options
        self.features, self.groups, self.device = list(features), groups, device
        self.output = net.output_names[0]
        self.whole = whole  # the model fixes its batch size: no short last batch
        self.changes = list(changes)  # graph inputs/outputs the student has reshaped (--allow-io-change)
        self.changed_inputs = {c.name for c in self.changes if c.role == "input"}
        self.output_kept = [(c.axis, c.kept) for c in self.changes if c.role == "output" and c.name == self.output]
        self.images = images  # (input, layout) to augment in training batches, or None
        self.precision = precision or Precision(torch, "cpu", ())
        self.shard = shard or Shard.current(torch, device)
        self.batch = self.shard.batch(options.batch_size, options.batch_size if whole else None)  # per rank
        self.runner = self.shard.wrap(net)  # the training forward pass: through DDP across ranks

    # --- the teacher's outputs, computed once -----------------------------------------
    def teacher_names(self) -> list[str]:
        return [self.output] + [f.name for f in self.features]

    def with_teacher_outputs(self, data: Dataset) -> Dataset:
        """``data`` carrying the teacher's outputs per sample (``TEACHER_KEY`` + name), so that
        the teacher runs once instead of every epoch; ``data`` itself when they would take more
        than ``TEACHER_CACHE_BYTES`` (large feature maps) or cannot be split per sample. Computed
        in float32 (no autocast): these are the targets of every epoch."""
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
        return replace(data, inputs={**data.inputs, **cached})

    # --- losses -------------------------------------------------------------------
    def losses(self, feeds: dict, labels, rng: np.random.Generator | None = None):
        """``feeds``: numpy arrays for the teacher (the original model), with its outputs when cached;
        with ``rng`` the images are augmented first (the teacher then runs on the same batch)."""
        torch, o = self.torch, self.options
        names = self.teacher_names()
        cached = {k[len(TEACHER_KEY):]: v for k, v in feeds.items() if k.startswith(TEACHER_KEY)}
        feeds = {k: v for k, v in feeds.items() if not k.startswith(TEACHER_KEY)}
        inputs = self.to_device(feeds)  # the teacher's
        if rng is not None and self.images is not None:
            name, layout = self.images
            with self.precision.exact():  # crop coordinates in float32
                inputs[name] = augment(torch, inputs[name], layout, rng)
            cached = {}
        changed = {k: v for k, v in iochange.candidate_feeds(feeds, self.changes).items() if k in self.changed_inputs}
        student = self.runner if self.net.training else self.net.run  # validation: no collective per batch
        values = student({**inputs, **self.to_device(changed)}, names)
        logits = values[self.output]
        total = logits.new_zeros(())
        teacher = None
        if self.teacher is not None:
            if cached:
                teacher = self.to_device(cached)
            else:
                with torch.no_grad():
                    teacher = self.teacher.run(inputs, names)
            for axis, kept in self.output_kept:  # compare the positions the student still produces
                index = torch.as_tensor(kept, device=teacher[self.output].device)
                teacher[self.output] = teacher[self.output].index_select(axis, index)
            total = total + losses.distill_loss(torch, o.distill_loss, o.temperature, logits, teacher[self.output])
            if self.features:  # the mean over the points: W weighs them all, however many there are
                matched = [losses.feature_loss(torch, values[f.name], teacher[f.name], f.axis, f.kept)
                           for f in self.features]
                total = total + o.feature_weight * sum(matched) / len(matched)
        if o.finetune:
            total = total + losses.finetune_loss(torch, o.loss, logits, labels)
        if o.sparsity_reg:
            total = total + o.sparsity_reg * losses.group_lasso(torch, self.net, self.groups)
        return total, logits, teacher[self.output] if teacher is not None else None

    # --- loops ----------------------------------------------------------------------
    def to_device(self, feeds: dict) -> dict:
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}

    def epoch(self, data: Dataset, optimizer, epoch: int, schedule, bar) -> tuple[float, int]:
        """One pass over ``data``: (mean training loss, samples). A non-finite batch loss ends the
        epoch before its step and is returned itself, so that its NaN never reaches the weights."""
        order = np.random.default_rng([self.options.seed, epoch]).permutation(len(data))
        shuffled = data.subset(self.shard.training_order(order))
        rng = np.random.default_rng([self.options.seed, epoch, 1]) if self.images is not None else None
        total, count = 0.0, 0
        self.net.train()
        for feeds, labels in shuffled.batches(self.batch, self.whole):
            with self.precision.autocast():
                loss, _, _ = self.losses(feeds, labels, rng)
            n = len(next(iter(feeds.values())))
            # over all ranks: a non-finite loss on any of them stops every one before the step
            summed, n = self.shard.total([float(loss.detach()) * n, n])
            value = summed / n
            if not math.isfinite(value):
                return value, count
            optimizer.zero_grad(set_to_none=True)
            self.precision.step(loss, optimizer, schedule)
            n = int(n)
            total += value * n
            count += n
            bar.update(n)
            bar.set_postfix(loss=f"{total / count:.4g}")
        return total / max(count, 1), count

    def validate(self, data: Dataset, epoch: int, train_loss: float) -> EpochLog:
        torch = self.torch
        self.net.eval()
        loss_sum, correct, count, error, compared = 0.0, 0, 0, ErrorSum(), False
        classes = class_labels(data.labels)
        with torch.no_grad():
            for feeds, labels in data.batches(self.options.batch_size, self.whole):
                with self.precision.autocast():
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
        # every rank measured its part: the sums over all of them, the same decision everywhere
        loss_sum, count, correct, error.squared, error.scale, broken = self.shard.total(
            [loss_sum, count, correct, error.squared, error.scale, float(error.broken)])
        error.broken = bool(broken)
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
