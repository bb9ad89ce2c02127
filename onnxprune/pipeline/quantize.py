"""Prune, then quantize: the pruned (and recovered) model quantized by onnxruntime.quantization.

    quantized, record = quantize(pruned, options.quantize, data, batch_size)

With calibration data the quantization is static (``quantize_static``: the
activations' ranges measured on the data, in the QDQ or QOperator format);
without data it is dynamic (``quantize_dynamic``: the activations' ranges
computed at run time, ConvInteger/MatMulInteger). Weights are ``int8`` or
``uint8`` as asked, per tensor or per channel; activations are uint8, the
pairing onnxruntime's CPU kernels are made for. Quantizing after the cut is
the order that keeps the accuracy: the scales are chosen for the channels
that remain, and recovery trained float weights.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from ..data import Dataset, model_batches
from ..errors import UnsupportedModel, UsageError, first_line
from ..rules.quant import QDQ, TWINS

LARGE_BYTES = 1 << 30  # above this the float model goes to the quantizer with external data
# onnxruntime's calibrator runs the samples at the batch it is given, every activation an output:
# EfficientNet-Lite1 calibrated on 64 photos peaks at 7.39 GB resident in batches of 32, 1.32 GB in
# batches of 4 (same output error), 0.73 GB on 128 photos one at a time (measured). So it sees one
# sample per run (unless the model's batch is fixed), at most this many, drawn with the seed.
CALIBRATION_SAMPLES = 128
CALIBRATION_BATCH = 1


QUANT_TYPES = ("int8", "uint8")
QUANT_FORMATS = ("qdq", "qoperator")


@dataclass
class QuantizeOptions:
    """What `quantize` asks (options.PruneOptions.quantize): the weights' type (activations are
    uint8, onnxruntime's choice for the CPU), one scale per channel or per tensor, the format: qdq
    (the default with data) or qoperator (dynamic quantization writes QOperator ops: ConvInteger,
    MatMulInteger); and where to write the float pruned model too."""

    dtype: str = "int8"
    per_channel: bool = False
    format: str | None = None
    keep_float: str | Path | None = None

    def check(self, has_data: bool) -> QuantizeOptions:
        """Raise for bad values; a copy with the format resolved."""
        if self.dtype not in QUANT_TYPES:
            raise UsageError(f"`quantize` must be one of {', '.join(QUANT_TYPES)}, got {self.dtype!r}")
        if self.format is not None and self.format not in QUANT_FORMATS:
            raise UsageError(f"`quantize_format` must be one of {', '.join(QUANT_FORMATS)}, got {self.format!r}")
        if self.format == "qdq" and not has_data:
            raise UsageError("`quantize_format` qdq is static quantization: give calibration `data` (without it, "
                             "quantization is dynamic, in the qoperator format)")
        return replace(self, format=self.format or ("qdq" if has_data else "qoperator"))


def check_quantize(quantize, has_data: bool, dry_run: bool) -> QuantizeOptions | None:
    """``quantize`` checked, for options.validate (a type name alone, ``"int8"``, stands for its defaults)."""
    if quantize is None:
        return None
    if isinstance(quantize, str):
        quantize = QuantizeOptions(quantize)
    if not isinstance(quantize, QuantizeOptions):
        raise UsageError(f"`quantize` must be one of {', '.join(QUANT_TYPES)}, got {quantize!r}")
    if dry_run:
        raise UsageError("`quantize` quantizes the written model: drop `dry_run`")
    return quantize.check(has_data)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over the batches of ``data``."""

    def __init__(self, data: Dataset, model: onnx.ModelProto, batch_size: int | None):
        self._batches = iter(feeds for feeds, _ in model_batches(data, model, batch_size)[0])

    def get_next(self):  # the protocol's one method (CalibrationDataReader.__subclasshook__)
        return next(self._batches, None)


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice on the root logger ("consider pre-processing"): not ours to print."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def refuse_quantized(model: onnx.ModelProto) -> None:
    """`quantize` takes a float model: onnxruntime cannot quantize a quantized one again."""
    quantized = {*QDQ, *TWINS, "DynamicQuantizeLinear"}
    found = next((n for n in model.graph.node if n.op_type in quantized), None)
    if found is not None:
        raise UsageError(f"`quantize`: the model is quantized already ({found.op_type} {found.name or found.output[0]})"
                         "; prune it without `quantize`")


def quantize(model: onnx.ModelProto, options: QuantizeOptions, data: Dataset | None) -> tuple[onnx.ModelProto, dict]:
    """``model`` quantized as ``options`` say (static on ``data``, dynamic without), and the record
    of how (the report's ``quantization``)."""
    from onnxruntime import quantization as ort_quant

    weights = ort_quant.QuantType.QInt8 if options.dtype == "int8" else ort_quant.QuantType.QUInt8
    large = model.ByteSize() > LARGE_BYTES
    with tempfile.TemporaryDirectory(prefix="onnxprune-quantize-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "quantized.onnx"
        onnx.save_model(model, str(source), save_as_external_data=large, location="float.onnx.data")
        try:
            with _quiet_quantizer():
                if data is None:
                    ort_quant.quantize_dynamic(str(source), str(target), per_channel=options.per_channel,
                                               weight_type=weights, use_external_data_format=large)
                else:
                    fmt = ort_quant.QuantFormat.QDQ if options.format == "qdq" else ort_quant.QuantFormat.QOperator
                    ort_quant.quantize_static(str(source), str(target), _Batches(data, model, CALIBRATION_BATCH),
                                              quant_format=fmt, per_channel=options.per_channel,
                                              weight_type=weights, activation_type=ort_quant.QuantType.QUInt8,
                                              use_external_data_format=large)
        except Exception as e:  # onnxruntime's quantizer: an op or a graph it cannot handle
            raise UnsupportedModel(f"onnxruntime.quantization failed on the pruned model: {first_line(e)}") from None
        quantized = onnx.load(str(target))  # external data read in now: the folder goes away
    record = {"mode": "dynamic" if data is None else "static", "dtype": options.dtype, "format": options.format,
              "per_channel": options.per_channel, "samples": 0 if data is None else len(data),
              "keep_float": str(options.keep_float) if options.keep_float else None}
    return quantized, record

