"""The int8 calibration search: calibration sets, methods and fp32 nodes, side by side.

    python bench/quant_search.py lite0 'base,p5,aug|P5|_conv_stem;_blocks.0;_blocks.1'
    python bench/quant_search.py lite0 --time FILE.onnx ...

Each option is a name from OPTS or ``CALIB|METHOD|PREFIXES``: CALIB ``12`` (the sample
photographs, ``calibration_inputs``) or ``aug`` (``augmented_calibration_inputs``);
METHOD ``MinMax``, ``Percentile`` or ``P5`` (Percentile 99.999); PREFIXES the
``;``-separated node names (or ``*suffix``) kept fp32; METHOD ``MSE`` is MinMax
narrowed per tensor to the range of least quantization error
(``beamzoo.zoo.quantize._mse_ranges``). A suffix ``+bc12`` or ``+bcaug`` applies
``beamzoo.zoo.quantize.correct_bias`` on that calibration set to the quantized model. The calibrated ranges are rounded
as the builder rounds them (``beamzoo.zoo.quantize._round_ranges``) and cached per
(set, method) within a run; each option's top-1 agreement with fp32 is measured on
benchmark images 1000-1399 (never used for calibration) and its model written to
``--out``. ``--time`` times the given model files against fp32 instead (batch 8, one
intra-op thread, taking turns, median thread CPU of ``--rounds``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import images  # noqa: E402
from models import pixels  # noqa: E402

BASE = ["_conv_stem", "_blocks.0"]
HEAD = ["_conv_head", "pool", "flatten", "_fc"]
OPTS = {  # name: (calibration set, method, method options, kept fp32, quantize_static keywords)
    "base": ("12", "MinMax", {}, BASE, {}),
    "aug": ("aug", "MinMax", {}, BASE, {}),
    "aug_fc": ("aug", "MinMax", {}, BASE + ["_fc"], {}),
    "aug_head": ("aug", "MinMax", {}, BASE + HEAD, {}),
    "12_fc": ("12", "MinMax", {}, BASE + ["_fc"], {}),
    "p3": ("aug", "Percentile", {"percentile": 99.9}, BASE, {}),
    "p4": ("aug", "Percentile", {"percentile": 99.99}, BASE, {}),
    "p5": ("aug", "Percentile", {"percentile": 99.999}, BASE, {}),
    "aug_rr": ("aug", "MinMax", {}, BASE, {"reduce_range": True}),
}


def sess(data: bytes, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def time_models(card, files, rounds):
    from beamzoo import zoo
    c = card.preprocess["crop"]
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, c, c)).astype(np.float32)
    s = {"fp32": sess(zoo.model_bytes(card), 1), **{f: sess(Path(f).read_bytes(), 1) for f in files}}
    t = {k: [] for k in s}
    for v in s.values():
        v.run(None, {"images": x})
    for _ in range(rounds):
        for k, v in s.items():
            t0 = time.thread_time()
            v.run(None, {"images": x})
            t[k].append((time.thread_time() - t0) * 1000 / 8)
    base = np.median(t["fp32"])
    for k in s:
        print(f"{np.median(t[k]):6.2f} ms  {base / np.median(t[k]):.2f} x  {k}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=("lite0", "lite1", "lite2"))
    p.add_argument("options", nargs="*")
    p.add_argument("--time", action="store_true")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=str(HERE / "results" / "quant_search"))
    p.add_argument("--cache", default=str(HERE / "cache"))
    args = p.parse_args(argv)

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, create_calibrator, quantize_static)
    from onnxruntime.quantization.calibrate import save_tensors_data
    from beamzoo import zoo
    from beamzoo.zoo import quantize as Q

    card = zoo.get(f"efficientnet_{args.variant}")
    if args.time:
        time_models(card, args.options, args.rounds)
        return 0
    which = ",".join(args.options).split(",")
    fp32, pre = zoo.model_bytes(card), card.preprocess
    paths = images.image_paths(images.make_set(args.cache, 2000, 0))[1000:1400]
    x = pixels(paths, card)

    def logits(data):
        s = sess(data, 2)
        return np.concatenate([s.run(None, {"images": x[i:i + 16]})[0] for i in range(0, len(x), 16)])

    ref = logits(fp32)
    names = [n.name for n in onnx.load_from_string(fp32).graph.node]
    sets, ranges, hists = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="quant-search-"))
    (tmp / "fp32.onnx").write_bytes(fp32)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def calib(name):
        if name not in sets:
            f = Q.calibration_inputs if name == "12" else Q.augmented_calibration_inputs
            sets[name] = f(pre["resize"], pre["crop"])
        return sets[name]

    def keep(prefixes):
        return [n for n in names if any((q.startswith("*") and n.endswith(q[1:])) or n == q
                                        or n.startswith(q + ".") for q in prefixes)]

    def get_ranges(cname, method, extra):
        key = (cname, method, json.dumps(extra, sort_keys=True))
        if key not in ranges and method == "Percentile" and (cname, method) in hists:
            c = hists[(cname, method)]  # the same histograms, another percentile
            c.collector.percentile = extra["percentile"]
            ranges[key] = tmp / f"r{len(ranges)}.json"
            save_tensors_data(Q._round_ranges(c.compute_data()), ranges[key])
        if key not in ranges:
            t = time.time()
            c = create_calibrator(tmp / "fp32.onnx", augmented_model_path=str(tmp / "aug.onnx"),
                                  calibrate_method=getattr(CalibrationMethod, "MinMax" if method == "MSE" else method),
                                  providers=["CPUExecutionProvider"], extra_options=extra)
            data = calib(cname)
            for i in range(0, len(data), 16):
                chunk = iter(data[i:i + 16])

                class R(CalibrationDataReader):
                    def get_next(self):
                        v = next(chunk, None)
                        return None if v is None else {"images": v}
                c.collect_data(R())
            ranges[key] = tmp / f"r{len(ranges)}.json"
            r = c.compute_data()
            if method == "MSE":
                from onnxruntime.quantization import TensorData, TensorsData
                mm = {k: tuple(float(np.asarray(v).item()) for v in r[k].range_value) for k in r.keys()}
                best = Q._mse_ranges(fp32, data, "images", mm)
                r = TensorsData(CalibrationMethod.MinMax, {k: TensorData(lowest=np.float32(best[k][0]),
                                                                          highest=np.float32(best[k][1])) for k in mm})
            save_tensors_data(Q._round_ranges(r), ranges[key])
            if method == "Percentile":
                hists[(cname, method)] = c
            print(f"  calibrated {key} in {time.time() - t:.0f}s", flush=True)
        return ranges[key]

    for w in which:
        t = time.time()
        w, _, bc = w.partition("+bc")
        if w in OPTS:
            cname, method, extra, excl, kw = OPTS[w]
        else:
            cname, method, e = w.split("|")
            extra = {"percentile": 99.999} if method == "P5" else {}
            method = "Percentile" if method == "P5" else method
            excl, kw = (e.split(";") if e else []), {}
        out = tmp / "int8.onnx"
        quantize_static(str(tmp / "fp32.onnx"), str(out), None,
                        calibration_cache_path=str(get_ranges(cname, method, extra)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, "MinMax" if method == "MSE" else method),
                        nodes_to_exclude=keep(excl), **kw)
        data = out.read_bytes()
        if bc:
            data = Q.correct_bias(data, fp32, calib(bc))
            w = f"{w}+bc{bc}"
        lg = logits(data)
        agree = (lg.argmax(1) == ref.argmax(1)).mean()
        print(f"{args.variant} {w}: top-1 = fp32 {100 * agree:.1f} %, logit corr "
              f"{np.corrcoef(lg.ravel(), ref.ravel())[0, 1]:.4f} ({time.time() - t:.0f}s)", flush=True)
        safe = w.replace("|", "~").replace(";", ",").replace("_blocks.", "b").replace("*", "S")
        (out_dir / f"{args.variant}_{safe}.onnx").write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
