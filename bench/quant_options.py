"""How the int8 models were chosen: onnxruntime quantization options side by side.

    python bench/quant_options.py --variant lite0

For one EfficientNet-Lite variant, quantizes its fp32 model with
``onnxruntime.quantization.quantize_static`` (calibrated on the sample
photographs, as the built-in int8 models are) in several ways, and reports
each one's top-1 agreement with fp32 on benchmark images 1000..1000+N (not the
ones bench/models.py reports on) and its thread CPU ms per image (batch 8, one
intra-op thread, all models taking turns, median of --rounds).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
from models import session  # noqa: E402


def options(fp32: bytes, variant: str) -> dict:
    """label -> quantize_static keywords."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType
    from beamzoo.zoo.efficientnet_lite import stages
    names = [n.name for n in onnx.load_from_string(fp32).graph.node]
    first, start = [], 0  # the block indices of each stage
    for repeats, *_ in stages(variant):
        first.append(list(range(start, start + repeats)))
        start += repeats

    def keep(*blocks):
        pre = ["_conv_stem"] + [f"_blocks.{b}" for b in blocks]
        return [n for n in names if any(n == p or n.startswith(p + ".") for p in pre)]

    qdq, u8 = dict(quant_format=QuantFormat.QDQ), dict(activation_type=QuantType.QUInt8)
    return {
        "QDQ, per-tensor": {**qdq, **u8, "per_channel": False},
        "QOperator, per-channel": {"quant_format": QuantFormat.QOperator, **u8, "per_channel": True},
        "QDQ, per-channel, int8 activations": {**qdq, "activation_type": QuantType.QInt8, "per_channel": True},
        "QDQ, per-channel": {**qdq, **u8, "per_channel": True},
        "  + fp32 stem, stage 1 (built-in until the calibration search)": {**qdq, **u8, "per_channel": True,
                                              "nodes_to_exclude": keep(*first[0])},
        "  + fp32 stages 1-2": {**qdq, **u8, "per_channel": True,
                                "nodes_to_exclude": keep(*first[0], *first[1])},
        "  + fp32 stages 1-2 + first block of 3-7": {
            **qdq, **u8, "per_channel": True,
            "nodes_to_exclude": keep(*first[0], *first[1], *(b[0] for b in first[2:]))},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="lite0", choices=("lite0", "lite1", "lite2"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--cache", default=str(HERE / "cache"))
    args = p.parse_args(argv)

    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from beamzoo import zoo
    from beamzoo.zoo.quantize import calibration_inputs
    from models import pixels

    card = zoo.get(f"efficientnet_{args.variant}")
    fp32 = zoo.model_bytes(card)
    calib = calibration_inputs(card.preprocess["resize"], card.preprocess["crop"])
    paths = images.image_paths(images.make_set(args.cache, 2000, 0))[1000:1000 + args.n]
    x = pixels(paths, card)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            v = next(self.it, None)
            return None if v is None else {"images": v}

    def top1(s):
        return np.concatenate([s.run(None, {"images": x[i:i + 8]})[0] for i in range(0, len(x), 8)]).argmax(1)

    class Bytes:  # what session() takes: something with model_bytes()
        def __init__(self, data):
            self.data = data

        def model_bytes(self):
            return self.data

    sessions = {"fp32": session(card)}
    for label, kw in options(fp32, args.variant).items():
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(fp32)
            quantize_static(str(src), str(out), Reader(), **kw)
            sessions[label] = session(Bytes(out.read_bytes()))
    ref = top1(sessions["fp32"])
    agree = {k: float((top1(s) == ref).mean()) for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"images": x[:8]})
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.thread_time()
            s.run(None, {"images": x[:8]})
            times[k].append((time.thread_time() - t) * 1000 / 8)
    base = np.median(times["fp32"])
    print(f"{args.variant}, top-1 agreement with fp32 on benchmark images 1000..{1000 + len(x) - 1}")
    print("| option | CPU ms/img | speed-up | top-1 = fp32 |\n|---|---|---|---|")
    for k in sessions:
        ms = np.median(times[k])
        print(f"| {k} | {ms:.2f} | {base / ms:.2f} x | {100 * agree[k]:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
