"""Channel multiples that suit each onnxruntime provider: the default --round-to of --provider.

A width the kernels handle badly can run slower than a wider one (see
REFERENCE.md: Torch-Pruning's unrounded ResNet-50 ran slower than the
original on the CUDA provider). ``--provider cpu|cuda`` makes every kept
channel count a multiple of the value below; an explicit --round-to wins. As
for any --round-to (plan.py), a group never keeps fewer than one multiple,
and a group narrower than one multiple stays whole.

cpu: measured with tools/measure_rounding.py (the rule is in its docstring)
    date 2026-11-24; machine: AMD EPYC, 2 cores, AVX2 (no AVX-512), shared with
    other jobs (1-min load 4 to 6 while measuring); onnxruntime 1.32.0,
    CPUExecutionProvider, 1 intra-op thread;
    command: .venv/bin/python tools/measure_rounding.py --provider cpu --threads 1
    (Conv 3x3 and 1x1 at 56/28/14/7 px, MatMul over 128 tokens, Gemm;
    batch 1 and 32; widths c..c+32 around c = 64, 128, 256, 512)
    result: MEASUREMENT_PENDING
cuda: NOT measured here (this machine has no GPU). NVIDIA's "Deep Learning
    Performance" guide (Convolutional Layers, quick-start checklist) asks for
    input and output channels divisible by 8 for FP16 or by 4 for TF32 to run
    on tensor cores; onnxruntime's CUDA provider runs float32 Conv/MatMul as
    TF32 by default (provider option use_tf32). 8 satisfies both, so a model
    converted to FP16 later keeps tensor-core-friendly widths. The guide's
    coarser advice (multiples of 64, ideally 256, against tile quantization)
    would take away most of the choice of widths; REFERENCE.md's H100 rows
    show no consistent gain for 32 or 64 over 8 at equal MACs.
    Re-measure on a GPU with: tools/measure_rounding.py --provider cuda
"""

from __future__ import annotations

from .errors import UsageError

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
        raise UsageError(f"--provider {name}: no rounding table for it; known: {', '.join(ROUNDING)}")
    return key


def round_to_for(provider: str) -> int:
    """The channel multiple for ``provider`` (the default --round-to of --provider)."""
    return ROUNDING[provider_key(provider)]["round_to"]
