"""The options of a pruning run: a few plain dataclasses, validated in one place.

    options = PruneOptions(widths=WidthOptions(ratio=0.4, round_to=8),
                           data=DataOptions(data="calib.npz"))
    options = PruneOptions.from_keywords(ratio=0.4, round_to=8, data="calib.npz")   # the same

They are built once, by the command line from its flags (cli/flags.py) or by
an API caller, and ``validate`` checks them, alone and together, before any
work; the steps below take them as given. Errors name an option as the
Python API spells it, in backticks (`round_to`); the command line shows its
flag instead (--round-to).

A field left at None means "not given": ``validate`` returns a copy with the
defaults filled in (importance l1; round_to "auto", or the multiple of
``provider``), so that it can tell an explicit choice from a default (a plan
applied exactly rejects an explicit importance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .checks import check_grid, check_ratio, check_ratio_mapping, parse_nm  # noqa: F401 (part of this API)
from .depth_options import DepthOptions, validate_depth
from .errors import UsageError, quoted
from .planning.plan import AUTO_ROUND_TO

DEFAULT_IMPORTANCE = "l1"
# The default where ratios are allocated by measured sensitivity (with data). Measured with
# reconstruction: EfficientNet-Lite1 at 0.7 of the MACs kept 75.2% held-out top-1 with obs and
# 70.4% with l1 (original 84.0%); the byte-level LM of tools/make_text_model.py at 0.75 of the
# MACs reached held-out perplexity 3.37 with obs and 3.46 with l1 (original 3.27). At one
# uniform ratio obs is not better everywhere (that LM at 0.3: 4.11 with obs, 3.73 with l1), so
# l1 stays the default there.
ALLOCATED_IMPORTANCE = "obs"
ALLOCATE_METHODS = ("uniform", "sensitivity")
DISTILL_LOSSES = ("auto", "kl", "mse")
FINETUNE_LOSSES = ("auto", "ce", "mse")
TARGET_METRICS = ("macs", "params", "speedup")
MIN_ELEMENTS = 1024  # sparsity: tensors with fewer weights stay dense (see cut/sparsity.py)


# --- the option groups ----------------------------------------------------------------------

@dataclass
class AnalysisOptions:
    """What may be grouped and cut."""

    input_shapes: dict[str, tuple[int, ...]] | None = None  # pinned dims of dynamic inputs
    ignore: tuple[str, ...] = ()  # node or weight name globs left alone
    prune_hidden: bool = False  # the hidden size of transformers too (through LayerNorm)
    allow_io_change: bool = False  # attention heads may reshape graph inputs/outputs (a KV cache)
    # grouped-query attention: remove whole key/value heads with their query heads (default: query
    # heads within each group, as many in every group; the key/value projections stay whole)
    prune_kv_groups: bool = False


@dataclass
class WidthOptions:
    """How many channels each group keeps, and which."""

    ratio: float | None = None  # fraction of each group's channels to remove
    head_ratio: float | None = None  # for groups of attention heads (default: ratio)
    ratios: dict[str, float] | None = None  # group id or source glob -> its own ratio
    # "sensitivity": per-group ratios from measured output error; "uniform": the same ratio for
    # every group; None: sensitivity for a budget with data, else uniform (validate)
    allocate: str | None = None
    plan: object | None = None  # a Plan (or a plan file) applied exactly, instead of a ratio
    importance: str | None = None  # criterion (default l1)
    global_ranking: bool = False  # rank the channels of all groups together
    # kept channels a multiple of this; "auto" (the default without a provider): 8, halved while
    # more than 12.5% off the requested count (planning/plan.py); with a provider, its measured multiple
    round_to: int | str | None = None
    provider: str | None = None  # round widths for this onnxruntime provider when round_to is not given
    min_channels: int = 1
    max_group_ratio: float = 0.9  # global ranking: at most this much of one group


@dataclass
class DataOptions:
    """Calibration and training data: for the data criteria, compensation, allocation, training, the gate."""

    data: object | None = None  # a Dataset, or a --data path (.npz, folder of .npz/.npy/images)
    calib_samples: int | None = None  # samples drawn with the seed (default all)
    batch_size: int | None = None  # samples per run (default 32, or the model's fixed batch)
    compensate: bool | None = None  # fold removed channels' means into biases (default: on with data)
    images: object | None = None  # data.ImageOptions for a folder of images
    reconstruct: bool | None = None  # refit the layers after a cut by least squares (default: on with data)


@dataclass
class TrainOptions:
    """Recovery in PyTorch (recovery/train.py): distillation from the original and/or fine-tuning."""

    epochs: int = 3
    # Measured on the ImageNet-pretrained EfficientNet-Lite1 (tools/bench_pretrained.py, 3 epochs
    # of distillation on 225 photos after reconstruction): validation loss 0.082 before, best
    # 0.059 at 1e-5, 0.055 at 3e-5, 0.069 at 1e-4 (worse after its first epoch), and 1e-3 wrecked
    # it (0.64, the best epoch was the untrained one). Pretrained weights want small steps; a
    # small model trained from scratch (the digits demo: --lr 0.003) wants large ones.
    lr: float = 3e-5
    batch_size: int = 64
    distill: bool = True
    finetune: bool = False
    distill_loss: str = "auto"
    temperature: float = 4.0
    loss: str = "auto"
    feature_weight: float = 0.0
    sparsity_reg: float = 0.0
    val_fraction: float = 0.1
    device: str = "auto"
    seed: int = 0
    quiet: bool = True
    # random resized crops and flips of the training batches (teacher and student see the same);
    # None: on for data read from a folder of images (Dataset.image_layout), off for arrays
    augment: bool | None = None

    def check(self) -> None:
        if self.augment not in (None, True, False):
            raise UsageError(f"`augment` must be True, False or None, got {self.augment!r}")
        if not (self.distill or self.finetune):
            raise UsageError("training needs `distill` or `finetune` (or both)")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("`epochs` and `batch_size` must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"`lr` must be a positive number, got {self.lr}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise UsageError(f"`distill_loss` must be one of {', '.join(DISTILL_LOSSES)}")
        if self.loss not in FINETUNE_LOSSES:
            raise UsageError(f"`loss` must be one of {', '.join(FINETUNE_LOSSES)}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"`val_fraction` must be in (0, 1), got {self.val_fraction}")
        if self.temperature <= 0 or self.sparsity_reg < 0 or self.feature_weight < 0:
            raise UsageError("`temperature` must be positive; `sparsity_reg` and `feature_weight` not negative")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"`device` must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class SparsityOptions:
    """Zero single weights after the structured step (or alone): a ratio, or N:M."""

    unstructured: float | None = None
    nm: object | None = None  # "2:4" or (2, 4)
    min_elements: int = MIN_ELEMENTS

    def check(self) -> tuple[int, int] | None:
        """Raise for bad values; the parsed N:M."""
        ratio, nm = self.unstructured, self.nm
        if ratio is not None and nm is not None:
            raise UsageError("`unstructured` and `nm` are exclusive: choose one sparsity pattern")
        if ratio is None and nm is None:
            raise UsageError("give a sparsity ratio (`unstructured`) or a pattern (`nm` N:M)")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or math.isnan(ratio) or not 0 <= ratio < 1):
            raise UsageError(f"`unstructured` must be in [0, 1), got {ratio}")
        if isinstance(self.min_elements, bool) or not isinstance(self.min_elements, int) or self.min_elements < 0:
            raise UsageError(f"`min_elements` must be a non-negative integer, got {self.min_elements}")
        return None if nm is None else parse_nm(nm)


@dataclass
class GateOptions:
    """Fail (nothing written) when the result falls short: worse than this on the validation
    split, or a smaller reduction of the MACs."""

    max_accuracy_drop: float | None = None  # top-1 points
    max_output_error: float | None = None  # relative RMS
    min_reduction: float | None = None  # original MACs / pruned MACs, at least (no data needed)


@dataclass
class Latency:
    """How to time base vs pruned with onnxruntime (runtime/bench.py), for --bench and --target-speedup."""

    provider: str = "cpu"
    batches: tuple[int, ...] = (1,)
    threads: int | None = None
    warmup: int = 10
    iters: int = 100

    def check(self) -> str:
        """The full provider name; a one-line UsageError when it is not available here."""
        from .runtime.bench import resolve_provider

        if not self.batches or min(self.batches) < 1:
            raise UsageError(f"`batches` must be at least 1, got {list(self.batches)}")
        if self.iters < 1 or self.warmup < 0:
            raise UsageError(f"`iters` must be at least 1 and `warmup` at least 0, got {self.iters}, {self.warmup}")
        return resolve_provider(self.provider)

    def time(self, paths: list, input_shapes: dict | None = None, batches=None, labels=None):
        """``runtime.bench.bench`` of ``paths`` (the first is the speedup reference)."""
        from .runtime.bench import bench

        return bench([str(p) for p in paths], list(batches or self.batches), provider=self.provider,
                     threads=self.threads, warmup=self.warmup, iters=self.iters, input_shapes=input_shapes,
                     labels=labels)


@dataclass
class Target:
    """A budget: ``value`` is the fraction of MACs/params kept, or the latency speedup to reach."""

    metric: str
    value: float
    latency: Latency | None = None  # speedup only: how to time (its first batch size is used)
    max_evaluations: int = 8  # speedup only: benchmark runs at most

    @property
    def option(self) -> str:
        return f"`target_{self.metric}`" if self.metric in TARGET_METRICS else "target"

    def check(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise UsageError(f"unknown target metric {self.metric!r}; choose from {', '.join(TARGET_METRICS)}")
        value = self.value
        if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            raise UsageError(f"{self.option} must be a number, got {value!r}")
        if self.metric != "speedup" and not 0 < value <= 1:
            raise UsageError(f"{self.option} is the fraction kept, in (0, 1], got {value}")
        if self.metric == "speedup":
            if value <= 0:
                raise UsageError(f"{self.option} must be positive, got {value}")
            if self.latency is None:
                raise UsageError(f"{self.option} measures latency: name the runtime with `provider` cpu|cuda")
            if self.max_evaluations < 2:
                raise UsageError(f"the speedup search needs at least 2 evaluations, got {self.max_evaluations}")
            self.latency.check()


@dataclass
class OutputOptions:
    """What a file run writes besides the model, and under which names the model's cache."""

    force: bool = False  # replace an existing output file (never one the run reads)
    dry_run: bool = False  # plan and report only
    plan_out: str | Path | None = None
    report_path: str | Path | None = None  # "-": standard output
    verify: bool = True  # run the written model against the original before it takes its name
    recipe: dict | None = None  # the command line's effective options (cli/recipe.py): report + metadata
    command: list[str] | None = None  # the command line, for the report
    summary_md: str | Path | None = None  # the Markdown summary (report/markdown.py); - for stdout
    reads: tuple = ()  # other files the run read (the command line's --ratios): never overwritten
    renumber_cache: bool = False  # a decoder's remaining KV cache renamed to layers 0..n-1 (cut/renumber.py)


@dataclass
class PruneOptions:
    """Everything one run of ``onnxprune MODEL ...`` (or ``prune_file``) is told."""

    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    widths: WidthOptions = field(default_factory=WidthOptions)
    data: DataOptions = field(default_factory=DataOptions)
    training: TrainOptions | None = None
    steps: int = 1  # prune in this many rounds, re-scoring (and recovering) between them
    sparsity: SparsityOptions | None = None
    depth: DepthOptions | None = None  # residual blocks removed whole (before the channels)
    gate: GateOptions | None = None
    target: Target | None = None
    bench: Latency | None = None
    quantize: object = None  # pipeline/quantize.py QuantizeOptions: quantize after pruning and recovery
    output: OutputOptions = field(default_factory=OutputOptions)
    seed: int = 0
    quiet: bool = True

    @classmethod
    def from_keywords(cls, **keywords) -> PruneOptions:
        """The documented keywords of ``prune()`` and ``prune_file()``, each put in its group."""
        return cls().with_keywords(**keywords)

    def with_keywords(self, **keywords) -> PruneOptions:
        """A copy with the keywords (see KEYWORDS) set in their groups."""
        groups: dict[str, dict] = {}
        top = {}
        for name, value in keywords.items():
            home = KEYWORDS.get(name)
            if home is None:
                raise TypeError(f"unexpected keyword argument {name!r}")
            group, attribute = home
            if group is None:
                top[attribute] = value
            else:
                groups.setdefault(group, {})[attribute] = value
        changed = {group: replace(getattr(self, group) or GROUPS[group](), **values)
                   for group, values in groups.items()}
        return replace(self, **changed, **top)


GROUPS = {"analysis": AnalysisOptions, "widths": WidthOptions, "data": DataOptions,
          "sparsity": SparsityOptions, "gate": GateOptions, "output": OutputOptions, "depth": DepthOptions}
# keyword -> (group, field); group None: a field of PruneOptions itself.
KEYWORDS: dict[str, tuple[str | None, str]] = {
    **{f.name: (group, f.name) for group, kind in GROUPS.items() for f in fields(kind)},
    "plan_in": ("widths", "plan"),
    "train": (None, "training"),
    **{name: (None, name) for name in ("training", "steps", "target", "bench", "quantize", "seed", "quiet")},
}


# --- validation -------------------------------------------------------------------------------

def validate_analysis(options: AnalysisOptions) -> AnalysisOptions:
    return replace(options, ignore=tuple(options.ignore or ()))


def validate_widths(widths: WidthOptions, has_data: bool, needs_amount: bool = True,
                    budget: bool = False) -> WidthOptions:
    """Check ``widths``; a copy with importance and round_to resolved. ``budget``: a target
    (MACs, params, or a speedup without depth) stands in for the ratio (of an allocation)."""
    from .runtime.hardware import round_to_for
    from .scoring.criteria import check_criterion

    check_ratio(widths.ratio)
    check_ratio(widths.head_ratio, "`head_ratio`")
    round_to = widths.round_to
    if round_to is not None and round_to != AUTO_ROUND_TO and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"`round_to` must be a positive integer or 'auto', got {round_to!r}")
    if widths.min_channels < 1:
        raise UsageError(f"`min_channels` must be at least 1, got {widths.min_channels}")
    if not 0 < widths.max_group_ratio < 1:
        raise UsageError(f"`max_group_ratio` must be in (0, 1), got {widths.max_group_ratio}")
    planned = widths.plan is not None
    if planned:
        if widths.ratio is not None:
            raise UsageError("`plan` and `ratio` are exclusive: a plan already says what to cut")
        if widths.importance is not None or widths.global_ranking or widths.round_to is not None:
            raise UsageError("`plan` applies a plan exactly; `importance`/`global_ranking`/`round_to` do not apply")
        if widths.ratios or widths.allocate == "sensitivity":
            raise UsageError("`plan` applies a plan exactly; `ratios`/`allocate` do not apply")
    _check_group_ratios(widths, has_data, budget)
    if needs_amount and widths.ratio is None and not planned and not widths.ratios:
        raise UsageError("give a ratio (`ratio`) or a plan (`plan`)")
    importance = widths.importance or (ALLOCATED_IMPORTANCE if has_data and widths.allocate == "sensitivity"
                                       else DEFAULT_IMPORTANCE)
    check_criterion(DEFAULT_IMPORTANCE if planned else importance, has_data)
    if round_to is None:
        round_to = round_to_for(widths.provider) if widths.provider else AUTO_ROUND_TO
    return replace(widths, importance=importance, round_to=round_to)


def _check_group_ratios(widths: WidthOptions, has_data: bool, budget: bool = False) -> None:
    """``budget``: a target gives the allocation its goal instead of a ratio."""
    if widths.ratios is not None:
        check_ratio_mapping(widths.ratios)
    if widths.allocate is not None and widths.allocate not in ALLOCATE_METHODS:
        raise UsageError(f"unknown `allocate` {widths.allocate!r}; choose from {', '.join(ALLOCATE_METHODS)}")
    if widths.allocate != "sensitivity":
        return
    if widths.ratios:
        raise UsageError("`ratios` and `allocate` are exclusive: the allocation chooses every group's ratio")
    if widths.ratio is None and not budget:
        raise UsageError("`allocate` sensitivity needs `ratio` R (the fraction of channels to remove overall) "
                         "or a `target_macs`/`target_params`/`target_speedup` budget")
    if not has_data:
        raise UsageError("`allocate` sensitivity measures output error on data: give `data` FILE")
    if widths.global_ranking:
        raise UsageError("`allocate` and `global_ranking` are exclusive: both decide how much each group loses")


def validate_data(data: DataOptions) -> DataOptions:
    if data.compensate and data.data is None:
        raise UsageError("`compensate` measures mean activations: give `data` FILE")
    if data.reconstruct and data.data is None:
        raise UsageError("`reconstruct` fits the pruned layers to the original's outputs on data: give `data` FILE")
    if data.calib_samples is not None and data.calib_samples < 1:
        raise UsageError(f"`calib_samples` must be at least 1, got {data.calib_samples}")
    if data.batch_size is not None and data.batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {data.batch_size}")
    if data.images is not None:
        data.images.check()
    return data


MAX_SEED = 2**32 - 1  # what every generator seeded from it takes (numpy's, torch's)


def validate(options: PruneOptions, whole_run: bool = True) -> PruneOptions:
    """Check every option, alone and against the others; a copy with the defaults resolved.

    Raises UsageError (one line, naming the options) before any work is done.
    ``whole_run``: the options of a file run (prune_file, the command line),
    where sparsity or a budget may stand in for the ratio; else of one prune.
    """
    has_data = options.data.data is not None
    seed = options.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"`seed` must be an integer in [0, {MAX_SEED}], got {quoted(seed)}")
    sparsity = options.sparsity
    if sparsity is not None:
        sparsity.check()
    sparse = sparsity is not None
    widths = options.widths
    if options.target is not None:
        _check_target(options)
    elif whole_run and widths.ratio is None and widths.plan is None and not widths.ratios and not sparse \
            and options.depth is None and not options.output.renumber_cache:  # renumbering a cut made elsewhere
        raise UsageError("nothing to do: give `ratio` R, `depth` R, `target_macs` F, `plan` FILE, `unstructured` R "
                         "or `nm` N:M")
    if sparse and sparsity.nm is not None and widths.global_ranking and widths.ratio is None:
        raise UsageError("`global_ranking` ranks channels or `unstructured` weights; `nm` keeps N of every M in place")
    structured = options.target is not None or widths.ratio is not None or widths.plan is not None \
        or bool(widths.ratios)
    budget = options.target is not None and options.target.metric in ("macs", "params")
    # a speedup with depth is met by one ratio over the shares of blocks (pipeline/budget_depth.py)
    allocatable = budget or (options.target is not None and options.depth is None)
    widths = _default_allocation(widths, has_data, allocatable)
    widths = validate_widths(widths, has_data, needs_amount=structured and options.target is None, budget=allocatable)
    data = validate_data(options.data)
    depth = validate_depth(options.depth, has_data, options.widths.plan is not None)
    _check_rounds(options, has_data)
    _check_min_reduction(options.gate, structured or options.depth is not None)
    if options.output.renumber_cache and not options.analysis.allow_io_change:
        raise UsageError("`renumber_cache` renames the cache inputs and outputs: it needs `allow_io_change`")
    if options.bench is not None:
        if options.output.dry_run:
            raise UsageError("`bench` times the written model: drop `dry_run`")
        options.bench.check()
    from .pipeline.quantize import check_quantize  # the quantization step's options live beside it

    quantize = check_quantize(options.quantize, has_data, options.output.dry_run)
    return replace(options, analysis=validate_analysis(options.analysis), widths=widths, data=data, depth=depth,
                   quantize=quantize)


def _default_allocation(widths: WidthOptions, has_data: bool, budget: bool) -> WidthOptions:
    """A budget with data (MACs, params, or a speedup without `depth`) is allocated by measured
    sensitivity (the channels go where the damage per MAC or parameter is smallest; a speedup
    searches how many MACs the allocation removes: pipeline/speedup_allocation.py) unless
    `allocate` says otherwise or the per-group ratios are fixed another way. On the
    ImageNet-pretrained EfficientNet-Lite1 at 0.7 of the MACs (250 held-out photos, original
    84.0%), with reconstruction, a uniform ratio kept 20.0% top-1 (obs) and about 1% (l1), the
    allocation 75.2% (obs) and 70.4% (l1): a uniform ratio cuts the residual stream and the stem
    as much as the rest. A ratio (`ratio`
    R) stays uniform: it names each group's fraction."""
    if widths.allocate is None and budget and has_data and not (widths.ratios or widths.global_ranking):
        return replace(widths, allocate="sensitivity")
    return widths


def _check_target(options: PruneOptions) -> None:
    """A target replaces the ratio; the options that fix the ratio otherwise cannot go with it."""
    target, widths = options.target, options.widths
    flag = target.option
    if widths.ratio is not None:
        raise UsageError(f"{flag} and `ratio` are exclusive: the target chooses the ratio")
    if widths.plan is not None:
        raise UsageError(f"{flag} and `plan` are exclusive: a plan already says what to cut")
    if options.steps > 1:
        raise UsageError(f"{flag} chooses one ratio; it does not combine with `steps`")
    if widths.allocate == "sensitivity" and target.metric == "speedup" and options.depth is not None:
        raise UsageError(f"{flag} with `depth` searches one ratio over the shares of blocks: "
                         "`allocate` sensitivity does not combine with them")
    target.check()


def _check_min_reduction(gate: GateOptions | None, structured: bool) -> None:
    minimum = gate.min_reduction if gate is not None else None
    if minimum is None:
        return
    if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or not math.isfinite(minimum) \
            or minimum <= 0:
        raise UsageError(f"`min_reduction` (original MACs / pruned MACs) must be a positive number, got {minimum!r}")
    if not structured:
        raise UsageError("`min_reduction` asks the channel cut to lower the MACs, and sparsity alone "
                         "(`unstructured`, `nm`) lowers none: give `ratio` R or a `target_macs` F")


def _check_rounds(options: PruneOptions, has_data: bool) -> None:
    training, gate = options.training, options.gate
    gated = gate is not None and (gate.max_accuracy_drop is not None or gate.max_output_error is not None)
    if (training is not None or gated) and not has_data:
        what = "`distill`/`finetune` train" if training is not None else "the quality gate measures"
        raise UsageError(f"{what} on data: give `data` FILE")
    if options.steps < 1:
        raise UsageError(f"`steps` must be at least 1, got {options.steps}")
    widths = options.widths
    if options.steps > 1 and (widths.ratio is None or widths.plan is not None) \
            and not (options.depth is not None and options.depth.depth):  # blocks in rounds (pipeline/depth.py)
        raise UsageError("`steps` K prunes `ratio` R in K rounds: give `ratio` (not `plan`)")
    if options.steps > 1 and (widths.ratios or widths.allocate == "sensitivity"):
        raise UsageError("`ratios`/`allocate` choose per-group ratios once; they do not combine with `steps`")
    if training is not None:
        training.check()
