"""Static int8 quantization of a built fp32 model with ``onnxruntime.quantization``.

The format was chosen by measurement on an AVX-512 VNNI Xeon (EfficientNet-Lite0,
batch 8, one thread): QDQ with uint8 activations and per-channel int8 weights.
Per-tensor weights ran as fast but kept only about half of the fp32 top-1s on
the benchmark images (per-channel: 87 %); QOperator ran within a few per cent
of QDQ; int8 activations were 1.7 x slower. Nodes named in ``keep_float``
stay fp32 (for EfficientNet-Lite, see ``beamzoo.zoo.builders.int8_keep_float``
and bench/README.md, "Built-in models").

Calibration runs the fp32 model on package-shipped photographs only, preprocessed
as a beamzoo pipeline would (short side to the card's resize, centre crop, value
range): ``calibration_inputs`` gives the 12 of ``beamzoo.samples.sample_files()``,
``augmented_calibration_inputs`` (what the built-in models use) 18 deterministic
views (mirror, crops, rotations, contrast and brightness) of those and 10 more of
scikit-image's photographs. The calibrated ranges are rounded outward to a coarse
grid before quantizing, so that float noise from another CPU's kernels gives the
same model bytes.

:func:`correct_bias` (empirical bias correction) is an option measured in
bench/README.md, not used by the built-in models: it brings the int8 logits closer
to fp32's, but its bytes change with float noise in the calibration runs.
"""
from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import numpy as np

from beamzoo.imaging import decode, decode_resized, resize_crop, scaled
from beamzoo.samples import _package_dir, sample_files

MAX_PIXELS = 1 << 28  # the photographs are known: the pixel limit only has to let them through


def calibration_inputs(resize: int, crop: int, value_range=(-1.0, 1.0)) -> list[np.ndarray]:
    """The sample photographs as [1, 3, crop, crop] float32 tensors, preprocessed as beamzoo's
    decode + resize step does (short side to ``resize``, centre crop, RGB, NCHW)."""
    return [scaled(decode_resized(p.read_bytes(), MAX_PIXELS, resize, resize, crop, "area", "RGB"), "NCHW",
                   value_range)[None] for p in sample_files()]


# More package-shipped photographs of scikit-image's data folder (textures, microscopy,
# a page of text, the right camera of the stereo pair), calibration material only.
EXTRA_PHOTOS = ("brick.png", "grass.png", "gravel.png", "cell.png", "clock_motion.png", "ihc.png",
                "moon.png", "motorcycle_right.png", "page.png", "text.png")


def calibration_photos() -> list[Path]:
    """The sample photographs, then :data:`EXTRA_PHOTOS`, in that order."""
    return list(sample_files()) + [_package_dir("skimage", "data") / n for n in EXTRA_PHOTOS]


def _variants(img: np.ndarray):
    """Deterministic views of one RGB uint8 photo: whole, mirrored, square crops of 3/4 and
    1/2 of the short side at the centre and the four corners, rotated by +-15 degrees,
    and with contrast and brightness changed."""
    import cv2
    h, w = img.shape[:2]
    yield img
    yield np.ascontiguousarray(img[:, ::-1])
    for frac in (0.75, 0.5):
        s = int(min(h, w) * frac)
        for y, x in ((h - s) // 2, (w - s) // 2), (0, 0), (0, w - s), (h - s, 0), (h - s, w - s):
            yield img[y:y + s, x:x + s]
    for angle in (-15.0, 15.0):
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
        yield cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    f = img.astype(np.float32)
    for gain, bias in ((0.7, 0.0), (1.3, 0.0), (1.0, -40.0), (1.0, 40.0)):
        yield np.clip((f - 128.0) * gain + 128.0 + bias, 0, 255).round().astype(np.uint8)


def augmented_calibration_inputs(resize: int, crop: int, value_range=(-1.0, 1.0)) -> list[np.ndarray]:
    """Many [1, 3, crop, crop] inputs from :func:`calibration_photos`: each photo decoded by
    beamzoo, then each of its :func:`_variants` resized and centre-cropped as ``DecodeResize``
    does (short side to ``resize``), in a fixed order."""
    out = []
    for path in calibration_photos():
        img = decode(path.read_bytes(), MAX_PIXELS, None, "RGB")
        for v in _variants(img):
            out.append(scaled(resize_crop(np.ascontiguousarray(v), resize, crop, "area"), "NCHW", value_range)[None])
    return out


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
             keep_float: tuple[str, ...] = (), method: str = "minmax",
             percentile: float = 99.999) -> bytes:
    """The int8 (QDQ) model made from the ``fp32`` model's bytes, calibrated on ``inputs``
    (each one batch, in order); nodes named by ``keep_float`` (a name or the prefix
    before its ".") stay fp32. ``method``: ``"minmax"`` (each activation's range is the
    lowest and highest value seen) or ``"percentile"`` (onnxruntime's histogram
    calibration: the range keeps ``percentile`` % of the absolute values seen, so rare
    outliers do not widen every tensor's step) or ``"mse"`` (each MinMax range narrowed to
    the one of least quantization error, :func:`_mse_ranges`). Everything is written to a temporary
    folder that no name in the model refers to."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, create_calibrator, quantize_static)
    from onnxruntime.quantization.calibrate import save_tensors_data

    keep = _float_nodes(fp32, keep_float)
    if not inputs:
        raise ValueError("no calibration inputs")
    methods = {"minmax": (CalibrationMethod.MinMax, {}), "mse": (CalibrationMethod.MinMax, {}),
               "percentile": (CalibrationMethod.Percentile, {"percentile": percentile})}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(methods)}")
    calib_method, calib_options = methods[method]

    class Reader(CalibrationDataReader):
        """``inputs[start:stop]``, one at a time: the calibrator is fed in chunks so that
        it never holds every intermediate output of hundreds of inputs at once."""

        def __init__(self, start, stop):
            self._it = iter(inputs[start:stop])

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory(prefix="beamzoo-quantize-") as tmp:
        tmp = Path(tmp)
        src, out, cache = tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "ranges.json"
        src.write_bytes(fp32)
        calibrator = create_calibrator(src, augmented_model_path=str(tmp / "augmented.onnx"),
                                       calibrate_method=calib_method,
                                       providers=["CPUExecutionProvider"],
                                       extra_options=calib_options)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            for start in range(0, len(inputs), 16):
                calibrator.collect_data(Reader(start, start + 16))
            ranges = calibrator.compute_data()
        if method == "mse":
            from onnxruntime.quantization import TensorData, TensorsData
            mm = {k: tuple(float(np.asarray(v).item()) for v in ranges[k].range_value) for k in ranges.keys()}
            best = _mse_ranges(fp32, inputs, input_name, mm)
            ranges = TensorsData(calib_method, {k: TensorData(lowest=np.float32(best[k][0]),
                                                              highest=np.float32(best[k][1])) for k in mm})
        save_tensors_data(_round_ranges(ranges), cache)
        del calibrator
        quantize_static(str(src), str(out), None, calibration_cache_path=str(cache),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib_method,
                        nodes_to_exclude=keep)
        model = onnx.load(str(out))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _session(data: bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _exposed(model, names) -> bytes:
    """``model`` (an onnx ModelProto, copied) with the tensors ``names`` as extra outputs."""
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m.SerializeToString()


def _channel_means(data: bytes, names, inputs, input_name, batch=16):
    """Per-channel (axis 1) means of the tensors ``names`` over ``inputs``, float64."""
    s = _session(data)
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    for i in range(0, len(inputs), batch):
        x = np.concatenate(inputs[i:i + batch])
        outs = s.run(list(names), {input_name: x})
        for n, v in zip(names, outs):
            v = v.astype(np.float64)
            sums[n] = sums[n] + v.sum(axis=(0, *range(2, v.ndim)))
            counts[n] += v.size // v.shape[1]
    return {n: sums[n] / counts[n] for n in names}


def _quantized_layers(qdq):
    """(node name, output, int32 bias initializer, bias scale initializer, output scale
    initializer or None) of each Conv and Gemm of the QDQ model whose bias is quantized,
    in graph order."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    quantizer = {n.input[0]: n.input[1] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    out = []
    for n in qdq.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            dq = producers.get(n.input[2])
            if dq is not None and dq.op_type == "DequantizeLinear":
                out.append((n.name, n.output[0], dq.input[0], dq.input[1], quantizer.get(n.output[0])))
    return out


def _mse_ranges(fp32: bytes, inputs, input_name, minmax, bins=4096, batch=8):
    """For each tensor of ``minmax`` (name: (lowest, highest) seen), the range among scaled
    copies of it that minimises the uint8 quantization error (rounding inside, clipping
    outside) of the tensor's values over ``inputs``, from a histogram."""
    import onnx
    names = sorted(minmax)
    data = _exposed(onnx.load_from_string(fp32), names)
    s = _session(data)
    edges = {n: np.linspace(min(minmax[n][0], 0.0), max(minmax[n][1], 0.0), bins + 1) for n in names}
    hist = {n: np.zeros(bins) for n in names}
    for i in range(0, len(inputs), batch):
        outs = s.run(names, {input_name: np.concatenate(inputs[i:i + batch])})
        for n, v in zip(names, outs):
            hist[n] += np.histogram(v, edges[n])[0]
    fs = np.linspace(0.2, 1.0, 33)
    out = {}
    for n in names:
        e, h = edges[n], hist[n]
        x = (e[1:] + e[:-1]) / 2
        lo0, hi0 = e[0], e[-1]
        best = None
        for fl in (fs if lo0 < 0 else [1.0]):
            for fh in (fs if hi0 > 0 else [1.0]):
                lo, hi = lo0 * fl, hi0 * fh
                step = (hi - lo) / 255
                err = np.where(x < lo, (x - lo) ** 2, np.where(x > hi, (x - hi) ** 2, step * step / 12))
                cost = float((h * err).sum())
                if best is None or cost < best[0]:
                    best = (cost, lo, hi)
        out[n] = best[1:]
    return out


def _upto(model, output: str) -> bytes:
    """``model`` cut down to the nodes that ``output`` needs, with ``output`` its one output."""
    import onnx
    producers = {o: n for n in model.graph.node for o in n.output}
    need, todo = set(), [output]
    while todo:
        n = producers.get(todo.pop())
        if n is not None and id(n) not in need:
            need.add(id(n))
            todo.extend(n.input)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(n for n in model.graph.node if id(n) in need)
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    return m.SerializeToString()


def correct_bias(qdq_bytes: bytes, fp32: bytes, inputs: list[np.ndarray], input_name: str = "images",
                 grid: float = 0.0) -> bytes:
    """Empirical bias correction: the int32 bias of each quantized Conv and Gemm of the QDQ
    model, in graph order, shifted so that the per-channel mean of its output over
    ``inputs`` is the fp32 model's, each measured with the layers before it corrected.
    ``grid``: the correction is rounded to multiples of ``grid`` times the output's
    quantization step (0: to the bias's own step)."""
    import onnx
    from onnx import numpy_helper
    ref_model = onnx.load_from_string(fp32)
    qdq = onnx.load_from_string(qdq_bytes)
    layers = _quantized_layers(qdq)
    fp_out = {n.name: n.output[0] for n in ref_model.graph.node}
    ref = _channel_means(_exposed(ref_model, [fp_out[name] for name, *_ in layers]),
                         [fp_out[name] for name, *_ in layers], inputs, input_name)
    inits = {i.name: i for i in qdq.graph.initializer}
    for name, o, b, s, so in layers:
        got = _channel_means(_upto(qdq, o), [o], inputs, input_name, batch=32)[o]
        bias = numpy_helper.to_array(inits[b]).astype(np.int64)
        scale = numpy_helper.to_array(inits[s]).astype(np.float64)
        delta = (got - ref[fp_out[name]]) / scale
        if grid and so is not None:
            g = np.maximum(1.0, np.round(grid * float(numpy_helper.to_array(inits[so])) / scale))
            delta = np.round(delta / g) * g
        new = np.clip(bias - np.round(delta), -2**31, 2**31 - 1).astype(np.int32)
        inits[b].CopyFrom(numpy_helper.from_array(new, b))
    return qdq.SerializeToString()
