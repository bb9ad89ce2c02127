"""Channel multiples that suit each onnxruntime provider: the default --round-to of --provider.

A width the kernels handle badly can run slower than a wider one (see
REFERENCE.md: Torch-Pruning's unrounded ResNet-50 ran slower than the
original on the CUDA provider). ``--provider cpu|cuda`` makes every kept
channel count a multiple of the value below; an explicit --round-to wins. As
for any --round-to (plan.py), a group never keeps fewer than one multiple,
and a group narrower than one multiple stays whole.

cpu: measured with tools/measure_rounding.py (the rule is in its docstring)
    date 2026-11-24; machine: AMD EPYC, 2 cores, AVX2 (no AVX-512), shared with
    other jobs (1-min load between 0.6 and 4.8 while measuring); onnxruntime 1.32.0,
    CPUExecutionProvider, default intra-op threads;
    command: .venv/bin/python -m tools.measure_rounding --provider cpu
    (stacks of 3 Conv 3x3 / Conv 1x1 at 56/28/14/7 px, MatMul over 128
    tokens, Gemm; batch 1 and 32; every width c..c+32 around c = 64, 128,
    256, 512; 3 sessions per width, fastest run kept)
    result: mean efficiency (work per time relative to the best width of its
    series) of widths that are multiples of m, over all 32 series:
        m = 1: 0.782   2: 0.799   4: 0.831   8: 0.847   16: 0.855   32: 0.855
    -> 8, the smallest within 0.02 of the best. Conv 3x3 carries the effect
    (batch 1: 0.664 for any width, 0.795 for multiples of 8; batch 32: 0.581
    -> 0.707), Conv 1x1 and MatMul less, Gemm not at all. The batch-32 series
    are the noisiest (runs of 0.1-0.8 s, timed a few widths at a time while
    the machine's load moved).
cuda: NOT measured here (this machine has no GPU). NVIDIA's "Deep Learning
    Performance" guide (Convolutional Layers, quick-start checklist) asks for
    input and output channels divisible by 8 for FP16 or by 4 for TF32 to run
    on tensor cores; onnxruntime's CUDA provider runs float32 Conv/MatMul as
    TF32 by default (provider option use_tf32). 8 satisfies both, so a model
    converted to FP16 later keeps tensor-core-friendly widths. The guide's
    coarser advice (multiples of 64, ideally 256, against tile quantization)
    would take away most of the choice of widths. REFERENCE.md's H100 rows
    (Torch-Pruning, ResNet-50) give efficiency 0.32 / 0.52 (batch 1 / 32) at
    multiples of 8, 0.29 / 0.50 at 32 and 0.40 / 0.58 at 64: 8 is the guide's
    requirement, not a measured optimum, and 64 may do better on an H100.
    Re-measure on a GPU with: python -m tools.measure_rounding --provider cuda
"""

from __future__ import annotations

from ..errors import UsageError

ROUNDING = {
    "cpu": {
        "round_to": 8,
        "measured": True,
        "source": "tools/measure_rounding.py --provider cpu --threads 1; 2026-11-24; AMD EPYC 2 cores AVX2; "
                  "onnxruntime 1.32.0",
    },
    "cuda": {
        "round_to": 8,
        "measured": False,
        "source": "not measured (no GPU here): NVIDIA Deep Learning Performance guide, channels divisible by 8 "
                  "(FP16) / 4 (TF32, onnxruntime's CUDA default)",
    },
}

_ALIASES = {"cpuexecutionprovider": "cpu", "cudaexecutionprovider": "cuda"}


def provider_key(name: str) -> str:
    """'cpu', 'cuda' or their full onnxruntime names -> the table's key."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ROUNDING:
        raise UsageError(f"`provider` {name}: no rounding table for it; known: {', '.join(ROUNDING)}")
    return key


def round_to_for(provider: str) -> int:
    """The channel multiple for ``provider`` (the default --round-to of --provider)."""
    return ROUNDING[provider_key(provider)]["round_to"]
