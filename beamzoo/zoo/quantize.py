"""Static int8 quantization of a built fp32 model with ``onnxruntime.quantization``.

The format was chosen by measurement on an AVX-512 VNNI Xeon (EfficientNet-Lite0,
batch 8, one thread): QDQ with uint8 activations and per-channel int8 weights.
Per-tensor weights ran as fast but kept only about half of the fp32 top-1s on
the benchmark images (per-channel: 87 %); QOperator ran within a few per cent
of QDQ; int8 activations were 1.7 x slower. Nodes named in ``keep_float``
stay fp32: for EfficientNet-Lite the stem and first block, which cost little
time and hold most of the top-1 changes (bench/README.md, "Built-in models").

Calibration runs the fp32 model on the package-shipped photographs
(``beamzoo.samples.sample_files()``, in that order), preprocessed as a beamzoo
pipeline would (``DecodeResize``) with the card's resize, crop and value range.
The calibrated ranges are rounded outward to a coarse grid before quantizing,
so that float noise from another CPU's kernels gives the same model bytes.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np


def calibration_inputs(resize: int, crop: int, value_range=(-1.0, 1.0)) -> list[np.ndarray]:
    """The sample photographs as [1, 3, crop, crop] float32 tensors, preprocessed by
    beamzoo's own DecodeResize (short side to ``resize``, centre crop, RGB, NCHW)."""
    from beamzoo.samples import sample_files
    from beamzoo.transforms.preprocess import DecodeResize
    step = DecodeResize(resize=resize, crop=crop, layout="NCHW", channels="RGB",
                        value_range=value_range)
    return [step.process_row({"data": p.read_bytes()})["pixels"][None] for p in sample_files()]


def _outward(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) widened to multiples of a power of two about 1/16 of their magnitude."""
    mag = max(abs(lo), abs(hi))
    if mag == 0:
        return 0.0, 0.0
    step = 2.0 ** (math.floor(math.log2(mag)) - 4)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step


def _round_ranges(ranges):
    from onnxruntime.quantization import TensorData, TensorsData
    data = {}
    for name in sorted(ranges.keys()):
        lo, hi = (np.asarray(v) for v in ranges[name].range_value)
        if lo.size != 1 or hi.size != 1:
            raise ValueError(f"expected one calibrated range per tensor, {name} has {lo.shape}")
        new = _outward(float(lo.item()), float(hi.item()))
        data[name] = TensorData(lowest=np.full_like(lo, new[0]), highest=np.full_like(hi, new[1]))
    return TensorsData(ranges.calibration_method, data)


def _float_nodes(fp32: bytes, prefixes) -> list[str]:
    """Names of the nodes that are, or start with, one of ``prefixes`` + "."."""
    import onnx
    names = [n.name for n in onnx.load_from_string(fp32).graph.node]
    out = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    missing = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if missing:
        raise ValueError(f"keep_float names nodes the model does not have: {', '.join(missing)}")
    return out


def quantize(fp32: bytes, inputs: list[np.ndarray], input_name: str = "images",
             keep_float: tuple[str, ...] = ()) -> bytes:
    """The int8 (QDQ) model made from the ``fp32`` model's bytes, calibrated on ``inputs``
    (each one batch, in order); nodes named by ``keep_float`` (a name or the prefix
    before its ".") stay fp32. Everything is written to a temporary folder that no
    name in the model refers to."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, create_calibrator, quantize_static)
    from onnxruntime.quantization.calibrate import save_tensors_data

    keep = _float_nodes(fp32, keep_float)
    if not inputs:
        raise ValueError("no calibration inputs")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(inputs)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory(prefix="beamzoo-quantize-") as tmp:
        tmp = Path(tmp)
        src, out, cache = tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "ranges.json"
        src.write_bytes(fp32)
        calibrator = create_calibrator(src, augmented_model_path=str(tmp / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       providers=["CPUExecutionProvider"])
        calibrator.collect_data(Reader())
        save_tensors_data(_round_ranges(calibrator.compute_data()), cache)
        del calibrator
        quantize_static(str(src), str(out), None, calibration_cache_path=str(cache),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=keep)
        model = onnx.load(str(out))
    onnx.checker.check_model(model)
    return model.SerializeToString()
